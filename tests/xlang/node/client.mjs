// A Node.js caller of the sage-finetune contract, to prove that it works from outside Python.
//
// It loads proto/sage/finetune/v1/finetune.proto at run time (no generated code) and connects with the published
// service config (client/finetune_client/service_config.json: retry policies) and keepalive, as any caller should.
// Scenario `contract` (the default):
//   1. ValidateConfig with a good config: prints the resolved lora.r and the memory estimate total;
//   2. ValidateConfig with a bad config: decodes the google.rpc.Status from the `grpc-status-details-bin` trailer
//      (ErrorInfo and BadRequest, packed in google.protobuf.Any);
//   3. Train with a tiny config: the first message is the job, then every event until the stream ends;
//   4. Generate with that job's adapter: prints the text pieces as they stream, then the finish message.
// Scenario `retries`, against a server that refuses the first call of each method with UNAVAILABLE:
//   1. GetServerInfo succeeds: grpc-js retried it, as the service config says;
//   2. Train (with a config validation refuses, so no job is made) is not retried: UNAVAILABLE, then the refusal.
// Progress goes to stderr; stdout gets one JSON object with everything observed. Exit 0 only when every call
// behaved as the contract says; any unexpected failure exits 1.
//
// Usage: node client.mjs --address HOST:PORT --model NAME --dataset NAME [--rpc-protos DIR] [--timeout SECONDS]
//                        [--scenario contract|retries] [--service-config FILE]
// DIR holds google/rpc/status.proto and error_details.proto (the googleapis-common-protos Python package ships them
// in site-packages/google/rpc, so DIR is site-packages); it defaults to $GOOGLE_RPC_PROTOS.

import path from "node:path";
import { fileURLToPath } from "node:url";
import { existsSync, readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PROTO_ROOT = path.resolve(HERE, "../../../proto");
const CONTRACT = "sage/finetune/v1/finetune.proto";
const SERVICE_CONFIG = path.resolve(HERE, "../../../client/finetune_client/service_config.json");
const DETAILS_TRAILER = "grpc-status-details-bin";
const FINAL_STATES = new Set(["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"]);
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

function parseOptions() {
  const { values } = parseArgs({
    options: {
      address: { type: "string" },
      model: { type: "string" },
      dataset: { type: "string" },
      "rpc-protos": { type: "string", default: process.env.GOOGLE_RPC_PROTOS ?? "" },
      timeout: { type: "string", default: "300" },
      scenario: { type: "string", default: "contract" },
      "service-config": { type: "string", default: SERVICE_CONFIG },
    },
    strict: true,
  });
  for (const required of ["address", "model", "dataset", "rpc-protos"]) {
    if (!values[required]) throw new Error(`--${required} is required`);
  }
  const rpcProtos = values["rpc-protos"];
  if (!existsSync(path.join(rpcProtos, "google/rpc/status.proto"))) {
    throw new Error(`${rpcProtos} has no google/rpc/status.proto`);
  }
  if (!(values.scenario in SCENARIOS)) throw new Error(`--scenario must be one of ${Object.keys(SCENARIOS)}`);
  return { ...values, rpcProtos, timeoutMs: Number(values.timeout) * 1000 };
}

/** The generated-at-runtime client of FineTuneService, with the published retry policies and keepalive. */
function makeClient(address, serviceConfigPath) {
  const definition = protoLoader.loadSync(CONTRACT, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the proto (lora.r, max_steps, ...)
    longs: String, // int64 as decimal strings: no silent precision loss
    enums: String, // enum values by name (JOB_STATE_SUCCEEDED)
    defaults: true,
    oneofs: true, // a virtual `kind` property names the set member of each oneof
  });
  const loaded = grpc.loadPackageDefinition(definition);
  const Service = loaded.sage.finetune.v1.FineTuneService;
  return new Service(address, grpc.credentials.createInsecure(), {
    "grpc.service_config": readFileSync(serviceConfigPath, "utf8"), // retries for the methods it names
    "grpc.keepalive_time_ms": 30000, // ping after 30 s of silence: a dead connection is noticed
    "grpc.keepalive_timeout_ms": 10000,
    "grpc.keepalive_permit_without_calls": 1,
  });
}

/** A protobufjs root that can decode google.rpc.Status and any detail the server packs (ours included). */
function makeDetailsRoot(rpcProtos) {
  const root = new protobuf.Root();
  const includeDirs = [PROTO_ROOT, rpcProtos];
  root.resolvePath = (_origin, target) => {
    if (path.isAbsolute(target)) return target;
    const found = includeDirs.map((dir) => path.join(dir, target)).find((candidate) => existsSync(candidate));
    return found ?? target;
  };
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto", CONTRACT], { keepCase: true });
  return root;
}

/** Unpack every Any in the status trailer: [{type, message}] with the message as a plain object. */
function decodeStatusDetails(root, error) {
  const raw = error.metadata?.get(DETAILS_TRAILER) ?? [];
  if (raw.length === 0) return null;
  const Status = root.lookupType("google.rpc.Status");
  const status = Status.decode(raw[0]);
  const details = status.details.map((any) => {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    const Type = root.lookupType(typeName);
    const message = Type.toObject(Type.decode(any.value), { longs: String, enums: String, defaults: true });
    return { type: typeName, message };
  });
  return { code: status.code, message: status.message, details };
}

function unary(client, method, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

async function validateGood(client, options) {
  const response = await unary(
    client,
    "ValidateConfig",
    { config: { model_name: options.model, dataset: options.dataset, max_length: 128, lora: { r: 8 } } },
    options.timeoutMs,
  );
  const resolved = response.resolved_config;
  console.error(`ValidateConfig(good): valid=${response.valid} lora.r=${resolved.lora.r} ` +
    `memory total=${response.memory_estimate.total_bytes} bytes`);
  return {
    valid: response.valid,
    violations: response.violations.map((v) => v.field),
    lora_r: resolved.lora.r,
    lora_alpha: resolved.lora.alpha,
    max_length: resolved.max_length,
    memory_total_bytes: response.memory_estimate.total_bytes,
    model_type: response.model?.model_type ?? "",
  };
}

async function validateBad(client, detailsRoot, options) {
  const config = { model_name: options.model, dataset: options.dataset, learning_rate: 0, lora: { r: 0 } };
  try {
    const response = await unary(client, "ValidateConfig", { config }, options.timeoutMs);
    throw new Error(`a bad config was accepted: valid=${response.valid}`);
  } catch (error) {
    if (error.code === undefined) throw error; // not a gRPC status: our own failure
    const status = decodeStatusDetails(detailsRoot, error);
    if (status === null) throw new Error(`no ${DETAILS_TRAILER} trailer on ${CODE_NAMES[error.code]}`);
    const info = status.details.find((d) => d.type === "google.rpc.ErrorInfo")?.message;
    const badRequest = status.details.find((d) => d.type === "google.rpc.BadRequest")?.message;
    const report = status.details.find((d) => d.type === "sage.finetune.v1.ValidateConfigResponse")?.message;
    const violations = (badRequest?.field_violations ?? []).map((v) => ({
      field: v.field,
      reason: v.reason,
      description: v.description,
    }));
    console.error(`ValidateConfig(bad): ${CODE_NAMES[error.code]} reason=${info?.reason} ` +
      `violations=${violations.map((v) => v.field).join(",")}`);
    return {
      code: CODE_NAMES[error.code],
      status_code: status.code,
      message: status.message,
      reason: info?.reason ?? "",
      domain: info?.domain ?? "",
      violations,
      detail_types: status.details.map((d) => d.type),
      report_valid: report?.valid ?? null,
    };
  }
}

function describeEvent(event) {
  const described = { sequence: Number(event.sequence), kind: event.kind };
  if (event.kind === "state_change") described.state = event.state_change.current;
  if (event.kind === "progress") described.step = event.progress.step;
  if (event.kind === "checkpoint") described.step = event.checkpoint.step;
  if (event.kind === "result") described.steps = event.result.steps;
  return described;
}

function train(client, options) {
  const config = {
    model_name: options.model,
    dataset: options.dataset,
    max_steps: 3,
    max_length: 128,
    per_device_train_batch_size: 4,
    lora: { r: 8 },
  };
  return new Promise((resolve, reject) => {
    const observed = { first_message: null, job: null, events: [], final_state: null };
    const call = client.Train({ config, display_name: "node-client" }, { deadline: Date.now() + options.timeoutMs });
    call.on("data", (message) => {
      if (observed.first_message === null) observed.first_message = message.kind;
      if (message.kind === "job") {
        observed.job = { id: message.job.id, state: message.job.state, lora_r: message.job.config.lora.r };
        console.error(`Train: job ${message.job.id} ${message.job.state}`);
        return;
      }
      const event = describeEvent(message.event);
      observed.events.push(event);
      console.error(`Train: event ${event.sequence} ${event.kind}${event.state ? ` ${event.state}` : ""}`);
      if (event.state && FINAL_STATES.has(event.state)) observed.final_state = event.state;
    });
    call.on("error", reject);
    call.on("end", () => resolve(observed));
  });
}

/** Generate with the trained job's adapter: the text pieces as they stream (echoed to stderr), then the finish. */
function generate(client, options, jobId) {
  const request = {
    messages: [{ role: "user", content: "What is the secret code of agent 1?" }],
    job_id: jobId,
    max_new_tokens: 4,
  };
  return new Promise((resolve, reject) => {
    const observed = { request, pieces: [], finish: null };
    const call = client.Generate(request, { deadline: Date.now() + options.timeoutMs });
    process.stderr.write("Generate: ");
    call.on("data", (message) => {
      if (message.kind === "text") {
        observed.pieces.push(message.text);
        process.stderr.write(JSON.stringify(message.text));
      } else if (message.kind === "finish") {
        const { reason, prompt_tokens, completion_tokens, step } = message.finish;
        observed.finish = { reason, prompt_tokens, completion_tokens, step };
        console.error(` (${reason}, ${completion_tokens} tokens)`);
      }
    });
    call.on("error", reject);
    call.on("end", () => resolve(observed));
  });
}

/** The status code (by name) a Train stream's first message brings, without retrying it here. */
function firstTrainCode(client, config, options) {
  return new Promise((resolve) => {
    const call = client.Train({ config }, { deadline: Date.now() + options.timeoutMs });
    call.on("data", () => {
      call.cancel();
      resolve("OK");
    });
    call.on("error", (error) => resolve(CODE_NAMES[error.code] ?? String(error.code)));
    call.on("end", () => resolve("OK"));
  });
}

async function retries(client, _detailsRoot, options) {
  const info = await unary(client, "GetServerInfo", {}, options.timeoutMs);
  console.error(`GetServerInfo: version ${info.version} (its first attempt was refused)`);
  const refused = { model_name: options.model, dataset: options.dataset, lora: { r: 0 } };
  const trainCodes = [await firstTrainCode(client, refused, options), await firstTrainCode(client, refused, options)];
  console.error(`Train twice: ${trainCodes.join(", ")}`);
  return { server_info_version: info.version, train_codes: trainCodes };
}

async function contract(client, detailsRoot, options) {
  const validated = {
    validate_good: await validateGood(client, options),
    validate_bad: await validateBad(client, detailsRoot, options),
  };
  const trained = await train(client, options);
  return { ...validated, train: trained, generate: await generate(client, options, trained.job.id) };
}

const SCENARIOS = { contract, retries };

async function main() {
  const options = parseOptions();
  const client = makeClient(options.address, options["service-config"]);
  const detailsRoot = makeDetailsRoot(options.rpcProtos);
  try {
    const result = await SCENARIOS[options.scenario](client, detailsRoot, options);
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    client.close();
  }
}

main().catch((error) => {
  const code = error.code !== undefined ? ` (${CODE_NAMES[error.code] ?? error.code})` : "";
  console.error(`node client failed${code}: ${error.stack ?? error}`);
  process.exitCode = 1;
});
