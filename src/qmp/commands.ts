/**
 * The typed command table: for each QMP command qsnap uses, the schema of its arguments and of
 * its `return` value, from QEMU 7.2's QAPI schema (the file in qapi/ is named per command).
 * `QmpClient.execute` types its arguments and result from this table and validates every reply
 * with it; commands not listed go through `executeRaw`.
 */
import { z } from 'zod';
import { versionInfoSchema } from './message.js';
import {
  blockDeviceInfoSchema,
  blockInfoSchema,
  blockJobInfoSchema,
  commandInfoSchema,
  commandLineOptionInfoSchema,
  cpuInfoFastSchema,
  jobInfoSchema,
  kvmInfoSchema,
  memdevSchema,
  memoryInfoSchema,
  migrateSetParametersSchema,
  migrationCapabilitySchema,
  migrationCapabilityStatusSchema,
  migrationInfoSchema,
  migrationParametersSchema,
  migrationStatusSchema,
  nameInfoSchema,
  objectPropertyInfoSchema,
  schemaInfoSchema,
  statusInfoSchema,
} from './qapi.js';

interface CommandSpec {
  args: z.ZodType;
  returns: z.ZodType;
}

/** No arguments. */
const none = z.object({});
/** Commands that return `{}`: any object is accepted (newer QEMUs may fill it), typed as undefined. */
const nothing = z.looseObject({}).transform((): undefined => undefined);

const onError = z.enum(['report', 'ignore', 'enospc', 'stop', 'auto']);

/** BlockdevSnapshotSync (qapi/block-core.json); give device or node-name. */
const blockdevSnapshotSyncArgs = z.object({
  device: z.string().optional(),
  'node-name': z.string().optional(),
  'snapshot-file': z.string(),
  'snapshot-node-name': z.string().optional(),
  format: z.string().optional(),
  mode: z.enum(['existing', 'absolute-paths']).optional(),
});

const blockdevSnapshotArgs = z.object({ node: z.string(), overlay: z.string() });

const dirtyBitmapArgs = z.object({ node: z.string(), name: z.string() });

/** TransactionAction (qapi/transaction.json): the actions qsnap uses. */
const transactionActionSchema = z.discriminatedUnion('type', [
  z.object({ type: z.literal('abort'), data: z.object({}) }),
  z.object({ type: z.literal('blockdev-snapshot-sync'), data: blockdevSnapshotSyncArgs }),
  z.object({ type: z.literal('blockdev-snapshot'), data: blockdevSnapshotArgs }),
  z.object({
    type: z.literal('blockdev-snapshot-internal-sync'),
    data: z.object({ device: z.string(), name: z.string() }),
  }),
  z.object({
    type: z.literal('block-dirty-bitmap-add'),
    data: dirtyBitmapArgs.extend({
      granularity: z.number().optional(),
      persistent: z.boolean().optional(),
      disabled: z.boolean().optional(),
    }),
  }),
  z.object({ type: z.literal('block-dirty-bitmap-remove'), data: dirtyBitmapArgs }),
  z.object({ type: z.literal('block-dirty-bitmap-clear'), data: dirtyBitmapArgs }),
]);
export type TransactionAction = z.input<typeof transactionActionSchema>;

/**
 * BlockdevOptions is a union over ~40 drivers; we type the common base and pass the
 * driver-specific members through (QEMU validates them).
 */
const blockdevOptionsSchema = z.looseObject({
  driver: z.string(),
  'node-name': z.string().optional(),
  'read-only': z.boolean().optional(),
  'auto-read-only': z.boolean().optional(),
  'force-share': z.boolean().optional(),
  discard: z.enum(['ignore', 'unmap']).optional(),
  'detect-zeroes': z.enum(['off', 'on', 'unmap']).optional(),
  cache: z.object({ direct: z.boolean().optional(), 'no-flush': z.boolean().optional() }).optional(),
});
export type BlockdevOptions = z.input<typeof blockdevOptionsSchema>;

const jobId = z.object({ id: z.string() });

export const commands = {
  // qapi/control.json
  qmp_capabilities: { args: z.object({ enable: z.array(z.literal('oob')).optional() }), returns: nothing },
  'query-version': { args: none, returns: versionInfoSchema },
  'query-commands': { args: none, returns: z.array(commandInfoSchema) },
  quit: { args: none, returns: nothing },

  // qapi/run-state.json, qapi/machine.json, qapi/misc.json
  'query-status': { args: none, returns: statusInfoSchema },
  stop: { args: none, returns: nothing },
  cont: { args: none, returns: nothing },
  system_reset: { args: none, returns: nothing },
  'query-name': { args: none, returns: nameInfoSchema },
  'query-kvm': { args: none, returns: kvmInfoSchema },
  'query-memory-size-summary': { args: none, returns: memoryInfoSchema },
  'query-memdev': { args: none, returns: z.array(memdevSchema) },
  'query-cpus-fast': { args: none, returns: z.array(cpuInfoFastSchema) },
  'query-command-line-options': {
    args: z.object({ option: z.string().optional() }),
    returns: z.array(commandLineOptionInfoSchema),
  },
  'human-monitor-command': {
    args: z.object({ 'command-line': z.string(), 'cpu-index': z.number().optional() }),
    returns: z.string(),
  },
  'query-qmp-schema': { args: none, returns: z.array(schemaInfoSchema) },

  // qapi/qom.json; a property's value has the property's own type.
  'qom-get': { args: z.object({ path: z.string(), property: z.string() }), returns: z.unknown() },
  'qom-list': { args: z.object({ path: z.string() }), returns: z.array(objectPropertyInfoSchema) },

  // qapi/qdev.json; a device's properties depend on its driver.
  device_add: {
    args: z.looseObject({ driver: z.string(), bus: z.string().optional(), id: z.string().optional() }),
    returns: nothing,
  },
  device_del: { args: z.object({ id: z.string() }), returns: nothing },

  // qapi/migration.json
  'query-migrate': { args: none, returns: migrationInfoSchema },
  'query-migrate-capabilities': {
    args: none,
    returns: z.array(migrationCapabilityStatusSchema),
  },
  'migrate-set-capabilities': {
    args: z.object({
      capabilities: z.array(z.object({ capability: migrationCapabilitySchema, state: z.boolean() })),
    }),
    returns: nothing,
  },
  'query-migrate-parameters': { args: none, returns: migrationParametersSchema },
  'migrate-set-parameters': { args: migrateSetParametersSchema, returns: nothing },
  migrate: {
    args: z.object({
      uri: z.string(),
      blk: z.boolean().optional(),
      inc: z.boolean().optional(),
      detach: z.boolean().optional(),
      resume: z.boolean().optional(),
    }),
    returns: nothing,
  },
  // `channels` (QEMU ≥ 8.2) instead of `uri`: a file channel takes any path (a uri cannot hold a comma).
  'migrate-incoming': {
    args: z.union([
      z.object({ uri: z.string() }),
      z.object({
        channels: z.array(
          z.object({
            'channel-type': z.literal('main'),
            addr: z.object({
              transport: z.literal('file'),
              filename: z.string(),
              offset: z.int().nonnegative(),
            }),
          }),
        ),
      }),
    ]),
    returns: nothing,
  },
  migrate_cancel: { args: none, returns: nothing },
  'migrate-continue': { args: z.object({ state: migrationStatusSchema }), returns: nothing },

  // qapi/transaction.json
  transaction: {
    args: z.object({
      actions: z.array(transactionActionSchema),
      properties: z.object({ 'completion-mode': z.enum(['individual', 'grouped']).optional() }).optional(),
    }),
    returns: nothing,
  },

  // qapi/block-core.json
  'query-block': { args: none, returns: z.array(blockInfoSchema) },
  'query-named-block-nodes': {
    args: z.object({ flat: z.boolean().optional() }),
    returns: z.array(blockDeviceInfoSchema),
  },
  'blockdev-add': { args: blockdevOptionsSchema, returns: nothing },
  'blockdev-del': { args: z.object({ 'node-name': z.string() }), returns: nothing },
  'blockdev-snapshot': { args: blockdevSnapshotArgs, returns: nothing },
  'blockdev-snapshot-sync': { args: blockdevSnapshotSyncArgs, returns: nothing },
  'block-commit': {
    args: z.object({
      'job-id': z.string().optional(),
      device: z.string(),
      'base-node': z.string().optional(),
      base: z.string().optional(),
      'top-node': z.string().optional(),
      top: z.string().optional(),
      'backing-file': z.string().optional(),
      speed: z.number().optional(),
      'on-error': onError.optional(),
      'filter-node-name': z.string().optional(),
      'auto-finalize': z.boolean().optional(),
      'auto-dismiss': z.boolean().optional(),
    }),
    returns: nothing,
  },
  'block-stream': {
    args: z.object({
      'job-id': z.string().optional(),
      device: z.string(),
      base: z.string().optional(),
      'base-node': z.string().optional(),
      bottom: z.string().optional(),
      'backing-file': z.string().optional(),
      speed: z.number().optional(),
      'on-error': onError.optional(),
      'filter-node-name': z.string().optional(),
      'auto-finalize': z.boolean().optional(),
      'auto-dismiss': z.boolean().optional(),
    }),
    returns: nothing,
  },
  'query-block-jobs': { args: none, returns: z.array(blockJobInfoSchema) },

  // qapi/job.json
  'query-jobs': { args: none, returns: z.array(jobInfoSchema) },
  'job-complete': { args: jobId, returns: nothing },
  'job-dismiss': { args: jobId, returns: nothing },
  'job-cancel': { args: jobId, returns: nothing },
  'job-finalize': { args: jobId, returns: nothing },
} as const satisfies Record<string, CommandSpec>;

export type CommandName = keyof typeof commands;

/** What a command takes, as the caller writes it. */
export type CommandArgs<N extends CommandName> = z.input<(typeof commands)[N]['args']>;

/** What a command returns, after validation. */
export type CommandReturn<N extends CommandName> = z.output<(typeof commands)[N]['returns']>;

export function isCommandName(name: string): name is CommandName {
  return Object.hasOwn(commands, name);
}
