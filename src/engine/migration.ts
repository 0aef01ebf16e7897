import type { CommandReturn, QmpClient } from '../qmp/index.js';
import { SnapshotError } from './errors.js';
import { refusalError } from './ram-protection.js';

/**
 * Capabilities that change the stream format or are refused together with background-snapshot
 * (migration/options.c migrate_caps_check); qsnap turns them off for its migration and puts
 * the user's settings back afterwards.
 */
const CONFLICTING = [
  'postcopy-ram',
  'multifd',
  'dirty-bitmaps',
  'xbzrle',
  'auto-converge',
  'return-path',
  'compress',
  'release-ram',
  'block',
  'x-colo',
  'postcopy-preempt',
  'zero-copy-send',
  'pause-before-switchover',
  'x-ignore-shared',
  'mapped-ram',
  'late-block-activate',
  'switchover-ack',
];

/** Default: no limit — a local snapshot should run at disk speed (QEMU's default is 128 MiB/s). */
export const UNLIMITED_BANDWIDTH = 2 ** 40;

/**
 * How a snapshot migrates: `background` a background snapshot; `precopy` a plain migration
 * (of a paused guest); `switchover` a live pre-copy migration that pauses before its switchover
 * (pause-before-switchover), with a downtime limit and optionally auto-converge.
 */
export type MigrationMode = 'background' | 'precopy' | 'switchover';

export interface MigrationWant {
  mode: MigrationMode;
  maxBandwidth: number | undefined;
  /** `switchover`: the downtime QEMU aims at when it decides to switch over (downtime-limit). */
  downtimeLimitMs?: number;
  /** `switchover`: throttle the guest's vCPUs while it dirties RAM faster than it is sent. */
  autoConverge?: boolean;
}

/** The migration parameters qsnap sets (and puts back): all numbers. */
export type TunedParameter = 'max-bandwidth' | 'downtime-limit';

export interface MigrationSettings {
  saved: {
    capabilities: { capability: string; state: boolean }[];
    parameters: Partial<Record<TunedParameter, number>>;
  };
}

export async function configureMigration(qmp: QmpClient, want: MigrationWant): Promise<MigrationSettings> {
  const [caps, params] = await Promise.all([
    qmp.execute('query-migrate-capabilities'),
    qmp.execute('query-migrate-parameters'),
  ]);
  const known = new Map(caps.map((c) => [c.capability as string, c.state]));
  if (want.mode === 'background' && !known.has('background-snapshot')) {
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_UNSUPPORTED',
      'this QEMU has no background-snapshot migration (needs QEMU ≥ 6.0)',
      { hint: 'upgrade QEMU' },
    );
  }
  const changes = capabilityChanges(known, want);
  const targets = parameterTargets(want);
  const saved: MigrationSettings['saved'] = {
    capabilities: changes.map(([name]) => ({ capability: name, state: known.get(name) ?? false })),
    parameters: savedParameters(params, targets),
  };
  if (changes.length) {
    try {
      // Turning the conflicting ones off must come before turning background-snapshot on.
      const ordered = changes.sort(([, a], [, b]) => Number(a) - Number(b));
      await qmp.execute('migrate-set-capabilities', {
        capabilities: ordered.map(([capability, state]) => ({ capability, state })),
      });
    } catch (err) {
      throw await refusalError(qmp, err);
    }
  }
  await qmp.execute('migrate-set-parameters', targets);
  return { saved };
}

/** The capabilities to change, as [name, wanted state]: the conflicting ones off, the mode's on. */
function capabilityChanges(known: Map<string, boolean>, want: MigrationWant): [string, boolean][] {
  const target = new Map<string, boolean>();
  for (const name of CONFLICTING) if (known.get(name)) target.set(name, false);
  if (known.has('background-snapshot')) target.set('background-snapshot', want.mode === 'background');
  if (want.mode === 'switchover') {
    target.set('pause-before-switchover', true);
    if (want.autoConverge) target.set('auto-converge', true);
  }
  target.set('events', true);
  return [...target].filter(([name, state]) => known.get(name) !== state);
}

function parameterTargets(want: MigrationWant): Partial<Record<TunedParameter, number>> {
  return {
    'max-bandwidth': want.maxBandwidth ?? UNLIMITED_BANDWIDTH,
    ...(want.mode === 'switchover' && want.downtimeLimitMs !== undefined
      ? { 'downtime-limit': Math.round(want.downtimeLimitMs) }
      : {}),
  };
}

/** The user's values of the parameters about to change (7.2 reports all of them). */
function savedParameters(
  params: CommandReturn<'query-migrate-parameters'>,
  targets: Partial<Record<TunedParameter, number>>,
): Partial<Record<TunedParameter, number>> {
  const saved: Partial<Record<TunedParameter, number>> = {};
  for (const name of Object.keys(targets) as TunedParameter[]) {
    const value = params[name];
    if (value !== undefined) saved[name] = value;
  }
  return saved;
}

export async function restoreMigration(qmp: QmpClient, settings: MigrationSettings): Promise<void> {
  const { capabilities, parameters } = settings.saved;
  if (capabilities.length) {
    // Turn background-snapshot off before anything it conflicts with goes back on.
    const ordered = [...capabilities].sort((a, b) => Number(a.state) - Number(b.state));
    await qmp.execute('migrate-set-capabilities', { capabilities: ordered });
  }
  if (Object.keys(parameters).length) await qmp.execute('migrate-set-parameters', parameters);
}

/** Migration states in which QEMU is still migrating (QAPI MigrationStatus). */
export const MIGRATION_UNSETTLED: ReadonlySet<string> = new Set([
  'active',
  'setup',
  'device',
  'cancelling',
  'pre-switchover',
  'wait-unplug',
]);

/** States a migration ends in, successfully or not. */
export const MIGRATION_ENDED: ReadonlySet<string> = new Set(['completed', 'failed', 'cancelled']);

export type MigrationInfo = CommandReturn<'query-migrate'>;

/**
 * Poll `query-migrate` every `intervalMs` until `done(status)` holds or `timeoutMs` passes;
 * returns the last reply and whether time ran out. The one loop every wait on a migration
 * (snapshot, restore, recovery) goes through.
 */
export async function pollMigration(
  qmp: QmpClient,
  options: { done: (status: string) => boolean; intervalMs: number; timeoutMs: number },
): Promise<{ info: MigrationInfo; timedOut: boolean }> {
  const deadline = Date.now() + options.timeoutMs;
  for (;;) {
    const info = await qmp.execute('query-migrate');
    if (options.done(info.status ?? 'none')) return { info, timedOut: false };
    if (Date.now() > deadline) return { info, timedOut: true };
    await new Promise((r) => setTimeout(r, options.intervalMs));
  }
}
