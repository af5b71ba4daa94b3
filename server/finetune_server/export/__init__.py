"""Exports: a job's adapter as an ADAPTER folder or MERGED 16-bit weights, packaged with checksums and a vLLM report.

`formats.ExportFormat` names the formats; `package.export_artifact` builds the artifact (it needs torch) inside an
export worker (`workers.export`); `vllm` says whether vLLM will serve the artifact and how (by
`training.vllm_rules`, the rule ValidateConfig applies too). Importing this package loads no torch.
"""
