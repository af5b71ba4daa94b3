"""Exports: a job's adapter as an ADAPTER folder or MERGED 16-bit weights, packaged with checksums and a vLLM report.

`package.export_artifact` builds the artifact (it needs torch) inside an export worker (`workers.export`); `vllm`
says whether vLLM will serve the artifact and how. Importing this package loads no torch.
"""
