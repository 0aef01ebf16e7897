/**
 * Zod schemas of the QAPI types qsnap reads, shared by the command table (commands.ts) and the
 * event table (events.ts). Shapes are QEMU 7.2's (qapi/*.json, checked against the live
 * `query-qmp-schema` and real replies of qemu-system-x86_64 7.2).
 *
 * Leniency rules:
 * - Objects are loose: newer QEMUs add members, and we keep what we do not know.
 * - Members qsnap reads are required and typed; members that newer or older QEMUs drop are
 *   optional (e.g. StatusInfo.singlestep, gone in 8.1 after deprecation).
 * - Enums are open (`openEnum`): the known values are typed, an unknown one from a newer QEMU is
 *   kept as a string rather than failing the whole reply.
 * - QAPI int/size are 64-bit; JSON.parse yields the nearest double, so they are plain numbers
 *   (zod's .int() would reject sizes above 2^53, e.g. a max-bandwidth of UINT64_MAX).
 */
import { z } from 'zod';

/** A QAPI enum that newer QEMUs may extend: known values for the type, any string accepted. */
export function openEnum<const T extends readonly [string, ...string[]]>(
  _known: T,
): z.ZodType<OpenEnum<T>, OpenEnum<T>> {
  return z.string() as z.ZodType<OpenEnum<T>, OpenEnum<T>>;
}

type OpenEnum<T extends readonly string[]> = T[number] | (string & {});

const int = z.number();

// qapi/run-state.json
export const runStateSchema = openEnum([
  'debug',
  'inmigrate',
  'internal-error',
  'io-error',
  'paused',
  'postmigrate',
  'prelaunch',
  'finish-migrate',
  'restore-vm',
  'running',
  'save-vm',
  'shutdown',
  'suspended',
  'watchdog',
  'guest-panicked',
  'colo',
]);
export type RunState = z.infer<typeof runStateSchema>;

export const statusInfoSchema = z.looseObject({
  running: z.boolean(),
  status: runStateSchema,
  /** Present up to QEMU 8.0. */
  singlestep: z.boolean().optional(),
});

export const shutdownCauseSchema = openEnum([
  'none',
  'host-error',
  'host-qmp-quit',
  'host-qmp-system-reset',
  'host-signal',
  'host-ui',
  'guest-shutdown',
  'guest-reset',
  'guest-panic',
  'subsystem-reset',
  'snapshot-load',
]);

// qapi/migration.json
export const migrationStatusSchema = openEnum([
  'none',
  'setup',
  'cancelling',
  'cancelled',
  'active',
  'postcopy-active',
  'postcopy-paused',
  'postcopy-recover',
  'completed',
  'failed',
  'colo',
  'pre-switchover',
  'device',
  'wait-unplug',
]);
export type MigrationStatus = z.infer<typeof migrationStatusSchema>;

export const migrationCapabilitySchema = openEnum([
  'xbzrle',
  'rdma-pin-all',
  'auto-converge',
  'zero-blocks',
  'compress',
  'events',
  'postcopy-ram',
  'x-colo',
  'release-ram',
  'block',
  'return-path',
  'pause-before-switchover',
  'multifd',
  'dirty-bitmaps',
  'postcopy-blocktime',
  'late-block-activate',
  'x-ignore-shared',
  'validate-uuid',
  'background-snapshot',
  'zero-copy-send',
  'postcopy-preempt',
]);
export type MigrationCapability = z.infer<typeof migrationCapabilitySchema>;

export const migrationCapabilityStatusSchema = z.looseObject({
  capability: migrationCapabilitySchema,
  state: z.boolean(),
});

/** MigrationStats: RAM counters. Only the core counters are required; the rest grew over versions. */
export const migrationStatsSchema = z.looseObject({
  transferred: int,
  remaining: int,
  total: int,
  duplicate: int,
  normal: int,
  'normal-bytes': int,
  'dirty-sync-count': int,
  'page-size': int,
  mbps: z.number(),
  skipped: int.optional(), // deprecated in 8.1, removed in 9.1
  'dirty-pages-rate': int.optional(),
  'postcopy-requests': int.optional(),
  'multifd-bytes': int.optional(),
  'pages-per-second': int.optional(),
  'precopy-bytes': int.optional(),
  'downtime-bytes': int.optional(),
  'postcopy-bytes': int.optional(),
  'dirty-sync-missed-zero-copy': int.optional(),
});

/** MigrationInfo. Every member is optional: before any migration QEMU 7.2 returns `{}`. */
export const migrationInfoSchema = z.looseObject({
  status: migrationStatusSchema.optional(),
  ram: migrationStatsSchema.optional(),
  'total-time': int.optional(),
  'expected-downtime': int.optional(),
  downtime: int.optional(),
  'setup-time': int.optional(),
  'cpu-throttle-percentage': int.optional(),
  'error-desc': z.string().optional(),
  'blocked-reasons': z.array(z.string()).optional(),
  'socket-address': z.array(z.looseObject({ type: z.string() })).optional(),
});

/**
 * MigrationParameters as query-migrate-parameters returns it (all members are optional in the
 * QAPI type; 7.2 fills all but block-bitmap-mapping). TLS strings are "" when unset.
 */
export const migrationParametersSchema = z.looseObject({
  'max-bandwidth': int.optional(),
  'downtime-limit': int.optional(),
  'max-postcopy-bandwidth': int.optional(),
  'multifd-channels': int.optional(),
  'multifd-compression': z.string().optional(),
  'xbzrle-cache-size': int.optional(),
  'x-checkpoint-delay': int.optional(),
  'tls-creds': z.string().optional(),
  'tls-hostname': z.string().optional(),
  'tls-authz': z.string().optional(),
  'announce-initial': int.optional(),
  'announce-max': int.optional(),
  'announce-rounds': int.optional(),
  'announce-step': int.optional(),
  'compress-level': int.optional(),
  'compress-threads': int.optional(),
  'compress-wait-thread': z.boolean().optional(),
  'decompress-threads': int.optional(),
  'throttle-trigger-threshold': int.optional(),
  'cpu-throttle-initial': int.optional(),
  'cpu-throttle-increment': int.optional(),
  'cpu-throttle-tailslow': z.boolean().optional(),
  'block-incremental': z.boolean().optional(),
  'max-cpu-throttle': int.optional(),
  'multifd-zlib-level': int.optional(),
  'multifd-zstd-level': int.optional(),
});

/** MigrateSetParameters: what migrate-set-parameters accepts (TLS strings may also be null). */
export const migrateSetParametersSchema = z.object({
  'max-bandwidth': int.optional(),
  'downtime-limit': int.optional(),
  'max-postcopy-bandwidth': int.optional(),
  'multifd-channels': int.optional(),
  'multifd-compression': z.enum(['none', 'zlib', 'zstd']).optional(),
  'xbzrle-cache-size': int.optional(),
  'tls-creds': z.string().nullable().optional(),
  'tls-hostname': z.string().nullable().optional(),
  'tls-authz': z.string().nullable().optional(),
  'announce-initial': int.optional(),
  'announce-max': int.optional(),
  'announce-rounds': int.optional(),
  'announce-step': int.optional(),
  'compress-level': int.optional(),
  'compress-threads': int.optional(),
  'compress-wait-thread': z.boolean().optional(),
  'decompress-threads': int.optional(),
  'throttle-trigger-threshold': int.optional(),
  'cpu-throttle-initial': int.optional(),
  'cpu-throttle-increment': int.optional(),
  'cpu-throttle-tailslow': z.boolean().optional(),
  'max-cpu-throttle': int.optional(),
});

// qapi/job.json
export const jobTypeSchema = openEnum([
  'commit',
  'stream',
  'mirror',
  'backup',
  'create',
  'amend',
  'snapshot-load',
  'snapshot-save',
  'snapshot-delete',
]);

/** JobStatus. "null" is a status name (the job is gone), not JSON null. */
export const jobStatusSchema = openEnum([
  'undefined',
  'created',
  'running',
  'paused',
  'ready',
  'standby',
  'waiting',
  'pending',
  'aborting',
  'concluded',
  'null',
]);
export type JobStatus = z.infer<typeof jobStatusSchema>;

export const jobInfoSchema = z.looseObject({
  id: z.string(),
  type: jobTypeSchema,
  status: jobStatusSchema,
  'current-progress': int,
  'total-progress': int,
  error: z.string().optional(),
});

// qapi/block-core.json
export const blockJobInfoSchema = z.looseObject({
  type: z.string(),
  device: z.string(),
  len: int,
  offset: int,
  busy: z.boolean(),
  paused: z.boolean(),
  speed: int,
  'io-status': z.string(),
  ready: z.boolean(),
  status: jobStatusSchema,
  'auto-finalize': z.boolean(),
  'auto-dismiss': z.boolean(),
  error: z.string().optional(),
});

/** ImageInfo. Recursive through backing-image; format-specific kept loose. */
export interface ImageInfo {
  filename: string;
  format: string;
  'virtual-size': number;
  'actual-size'?: number | undefined;
  'cluster-size'?: number | undefined;
  'dirty-flag'?: boolean | undefined;
  'backing-filename'?: string | undefined;
  'full-backing-filename'?: string | undefined;
  'backing-filename-format'?: string | undefined;
  'backing-image'?: ImageInfo | undefined;
  'format-specific'?: { type: string; data?: Record<string, unknown> | undefined } | undefined;
  [key: string]: unknown;
}

export const imageInfoSchema: z.ZodType<ImageInfo> = z.looseObject({
  filename: z.string(),
  format: z.string(),
  'virtual-size': int,
  'actual-size': int.optional(),
  'cluster-size': int.optional(),
  'dirty-flag': z.boolean().optional(),
  'backing-filename': z.string().optional(),
  'full-backing-filename': z.string().optional(),
  'backing-filename-format': z.string().optional(),
  get 'backing-image'() {
    return imageInfoSchema.optional();
  },
  'format-specific': z
    .looseObject({ type: z.string(), data: z.record(z.string(), z.unknown()).optional() })
    .optional(),
});

/**
 * BlockDeviceInfo: one node, as in query-block's `inserted` and query-named-block-nodes.
 * Auto-named nodes are called "#blockNNN"; `drv` is the node's driver ("qcow2", "file"…).
 */
export const blockDeviceInfoSchema = z.looseObject({
  file: z.string(),
  'node-name': z.string().optional(),
  ro: z.boolean(),
  drv: z.string(),
  backing_file: z.string().optional(),
  backing_file_depth: int,
  encrypted: z.boolean(),
  detect_zeroes: z.string(),
  image: imageInfoSchema,
  cache: z.looseObject({ writeback: z.boolean(), direct: z.boolean(), 'no-flush': z.boolean() }),
  write_threshold: int,
});

/** BlockInfo: one drive (BlockBackend) from query-block; `inserted` is absent for an empty drive. */
export const blockInfoSchema = z.looseObject({
  device: z.string(),
  qdev: z.string().optional(),
  type: z.string().optional(), // always "unknown"; deprecated
  removable: z.boolean(),
  locked: z.boolean(),
  inserted: blockDeviceInfoSchema.optional(),
  tray_open: z.boolean().optional(),
  'io-status': z.string().optional(),
});

// qapi/machine.json
export const memoryInfoSchema = z.looseObject({
  'base-memory': int,
  'plugged-memory': int.optional(),
});

export const memdevSchema = z.looseObject({
  id: z.string().optional(),
  size: int,
  merge: z.boolean(),
  dump: z.boolean(),
  prealloc: z.boolean(),
  share: z.boolean(),
  reserve: z.boolean().optional(),
  'host-nodes': z.array(int),
  policy: z.string(),
});

/** CpuInfoFast. QEMU 7.2 has `target` and no longer the `arch` removed in 6.0. */
export const cpuInfoFastSchema = z.looseObject({
  'cpu-index': int,
  'qom-path': z.string(),
  'thread-id': int,
  target: z.string(),
  props: z.record(z.string(), int).optional(),
});

// qapi/qom.json
export const objectPropertyInfoSchema = z.looseObject({
  name: z.string(),
  type: z.string(),
  description: z.string().optional(),
  'default-value': z.unknown().optional(),
});

// qapi/misc.json
export const commandLineOptionInfoSchema = z.looseObject({
  option: z.string(),
  parameters: z.array(
    z.looseObject({
      name: z.string(),
      type: z.string(),
      help: z.string().optional(),
      default: z.string().optional(),
    }),
  ),
});

export const kvmInfoSchema = z.looseObject({ enabled: z.boolean(), present: z.boolean() });
export const nameInfoSchema = z.looseObject({ name: z.string().optional() });
export const commandInfoSchema = z.looseObject({ name: z.string() });

/** SchemaInfo from query-qmp-schema: every entity has a name and a meta-type. */
export const schemaInfoSchema = z.looseObject({ name: z.string(), 'meta-type': z.string() });
