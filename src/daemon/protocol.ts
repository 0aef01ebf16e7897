import { z } from 'zod';

/**
 * The daemon's wire protocol, version 1 (docs/api.md): every frame is one JSON object, checked
 * against these schemas on both sides — the daemon parses each request before it acts and
 * checks each frame it sends; the client (src/client) checks each frame it receives.
 *
 *   request  {"v"?: 1, "id": "...", "op": "<op>", "args": {...}}
 *   reply    {"v": 1, "id": "...", "op"?: "<operation id>", "ok": true, "result": {...}}
 *            {"v": 1, "id": "...", "ok": false, "error": {"code": "QSNAP_…", "message", "hint"?}}
 *   event    {"v": 1, "event": "phase" | "progress" | "result" | "vm" | …, "op"?: "<operation id>", …}
 *
 * Names are snapshot names of the store (1–64 of A-Z a-z 0-9 . _ -) and are checked again by
 * the store; paths come only where an op needs one (a QMP socket) and are checked by the daemon.
 */
export const PROTOCOL_VERSION = 1;

/** A request id: the client's own, unique among its requests in flight. */
const RequestId = z.string().min(1).max(64);
/** A daemon operation id (`o-…`) or VM id (`vm-…`). */
const DaemonId = z.string().regex(/^[a-z]{1,3}-[A-Za-z0-9]{1,32}$/);
const SnapshotName = z.string().min(1).max(64);
const QemuArgv = z.array(z.string().max(4096)).min(1).max(512);
/** Ask for a refusal (QSNAP_BUSY) instead of a place in the VM's queue. */
const Wait = z.boolean().optional();

export const OpArgs = {
  attach: z.strictObject({ qmp: z.string().min(1).max(107), name: SnapshotName.optional() }),
  detach: z.strictObject({ vm: DaemonId }),
  launch: z.strictObject({ argv: QemuArgv, name: SnapshotName.optional() }),
  /** resetStats: start the daemon's event-loop delay figures afresh (after this answer). */
  vms: z.strictObject({ resetStats: z.boolean().optional() }),
  status: z.strictObject({ vm: DaemonId }),
  snapshot: z.strictObject({
    vm: DaemonId,
    name: SnapshotName,
    overwrite: z.boolean().optional(),
    maxBandwidth: z.number().int().positive().optional(),
    wait: Wait,
  }),
  restore: z.strictObject({
    name: SnapshotName,
    lazy: z.boolean().optional(),
    paused: z.boolean().optional(),
    argv: QemuArgv.optional(),
    trustCmdline: z.boolean().optional(),
  }),
  revert: z.strictObject({ vm: DaemonId, name: SnapshotName, lazy: z.boolean().optional(), wait: Wait }),
  list: z.strictObject({}),
  inspect: z.strictObject({ name: SnapshotName }),
  verify: z.strictObject({ name: SnapshotName }),
  delete: z.strictObject({ names: z.array(SnapshotName).min(1).max(256), dryRun: z.boolean().optional() }),
  gc: z.strictObject({ dryRun: z.boolean().optional() }),
  cancel: z.strictObject({ op: DaemonId }),
  subscribe: z.strictObject({ vms: z.array(DaemonId).max(256).optional() }),
  result: z.strictObject({ op: DaemonId }),
} as const;

export type OpName = keyof typeof OpArgs;
export const OP_NAMES = Object.keys(OpArgs) as OpName[];
export type ArgsOf<O extends OpName> = z.infer<(typeof OpArgs)[O]>;

/** The envelope of a request; its args are checked against the op's own schema next. */
export const RequestEnvelope = z.strictObject({
  v: z.literal(PROTOCOL_VERSION).optional(),
  id: RequestId,
  op: z.string().max(32),
  args: z.record(z.string(), z.unknown()).optional(),
});

export const ErrorBody = z.object({
  code: z.string().regex(/^QSNAP_[A-Z0-9_]+$/),
  message: z.string(),
  hint: z.string().optional(),
  details: z.record(z.string(), z.unknown()).optional(),
});
export type ErrorBody = z.infer<typeof ErrorBody>;

export const Reply = z.union([
  z.object({
    v: z.literal(PROTOCOL_VERSION),
    id: RequestId,
    op: DaemonId.optional(),
    ok: z.literal(true),
    result: z.record(z.string(), z.unknown()),
  }),
  z.object({
    v: z.literal(PROTOCOL_VERSION),
    /** Null when the frame could not be read far enough to find its id. */
    id: RequestId.nullable(),
    op: DaemonId.optional(),
    ok: z.literal(false),
    error: ErrorBody,
  }),
]);
export type Reply = z.infer<typeof Reply>;

const EventBase = {
  v: z.literal(PROTOCOL_VERSION),
  /** The operation the event belongs to. */
  op: DaemonId.optional(),
  /** The request that started the operation (only in events sent to the client that asked). */
  id: RequestId.optional(),
  vm: DaemonId.optional(),
  /** The op name: snapshot, restore, … */
  kind: z.string().optional(),
};

export const Event = z.discriminatedUnion('event', [
  /** Queued (with its position), started, or an engine phase; `atMs` since the operation was asked for. */
  z.object({
    ...EventBase,
    event: z.literal('phase'),
    phase: z.string(),
    detail: z.string().optional(),
    atMs: z.number(),
    position: z.number().int().optional(),
  }),
  z.object({
    ...EventBase,
    event: z.literal('progress'),
    seq: z.number().int(),
    doneBytes: z.number(),
    totalBytes: z.number(),
    etaMs: z.number().optional(),
  }),
  z.object({
    ...EventBase,
    event: z.literal('result'),
    ok: z.boolean(),
    result: z.record(z.string(), z.unknown()).optional(),
    error: ErrorBody.optional(),
  }),
  z.object({ ...EventBase, event: z.literal('info'), message: z.string(), code: z.string().optional() }),
  /** A VM attached, detached, gone, or its state changed; `state` is its run state or `gone`. */
  z.object({
    ...EventBase,
    event: z.literal('vm'),
    change: z.enum(['attached', 'detached', 'gone', 'state']),
    state: z.string().optional(),
    name: z.string().optional(),
  }),
  /** The store changed (a snapshot was added or deleted): clients refresh their list. */
  z.object({ ...EventBase, event: z.literal('store') }),
]);
export type Event = z.infer<typeof Event>;
export type EventName = Event['event'];

/** Any frame the daemon sends. */
export const ServerFrame = z.union([Reply, Event]);
export type ServerFrame = z.infer<typeof ServerFrame>;

/** Limits the daemon enforces (and the client can read from docs/api.md). */
export const LIMITS = {
  /** Largest frame accepted; a larger one closes the connection with 1009. */
  maxFrameBytes: 64 * 1024,
  /** Requests of one connection in flight at once; more get QSNAP_DAEMON_LIMIT. */
  maxInFlight: 64,
  /** Connections at once; more are refused at the upgrade (HTTP 503). */
  maxConnections: 64,
  /** How long the result of an operation is kept for `result` after it ended. */
  keepResultsMs: 15 * 60_000,
  /** Results kept at most. */
  keepResults: 256,
} as const;
