import { statfs } from 'node:fs/promises';
import type { CommandReturn, QmpClient } from '../qmp/index.js';
import { SnapshotError } from './errors.js';

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

export interface MigrationSettings {
  saved: { capabilities: { capability: string; state: boolean }[]; maxBandwidth?: number };
}

export async function configureMigration(
  qmp: QmpClient,
  want: { background: boolean; maxBandwidth: number | undefined },
): Promise<MigrationSettings> {
  const [caps, params] = await Promise.all([
    qmp.execute('query-migrate-capabilities'),
    qmp.execute('query-migrate-parameters'),
  ]);
  const known = new Map(caps.map((c) => [c.capability as string, c.state]));
  if (want.background && !known.has('background-snapshot')) {
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_UNSUPPORTED',
      'this QEMU has no background-snapshot migration (needs QEMU ≥ 6.0)',
      {
        hint: 'upgrade QEMU',
      },
    );
  }
  const target = new Map<string, boolean>();
  for (const name of CONFLICTING) if (known.get(name)) target.set(name, false);
  if (known.has('background-snapshot')) target.set('background-snapshot', want.background);
  target.set('events', true);
  const changes = [...target].filter(([name, state]) => known.get(name) !== state);
  const saved: MigrationSettings['saved'] = {
    capabilities: changes.map(([name]) => ({ capability: name, state: known.get(name) ?? false })),
    ...(params['max-bandwidth'] !== undefined ? { maxBandwidth: params['max-bandwidth'] } : {}),
  };
  if (changes.length) {
    try {
      // Turning the conflicting ones off must come before turning background-snapshot on.
      const ordered = changes.sort(([, a], [, b]) => Number(a) - Number(b));
      await qmp.execute('migrate-set-capabilities', {
        capabilities: ordered.map(([capability, state]) => ({ capability, state })),
      });
    } catch (err) {
      throw new SnapshotError(
        'QSNAP_SNAPSHOT_UNSUPPORTED',
        `QEMU refused the snapshot settings: ${(err as Error).message}`,
        { hint: await unsupportedHint(qmp), cause: err },
      );
    }
  }
  await qmp.execute('migrate-set-parameters', { 'max-bandwidth': want.maxBandwidth ?? UNLIMITED_BANDWIDTH });
  return { saved };
}

/** statfs f_type of tmpfs and hugetlbfs: file-backed RAM userfaultfd can write-protect. */
export const TMPFS_MAGIC = 0x01021994;
const HUGETLBFS_MAGIC = 0x958458f6;

/**
 * Why QEMU may refuse background-snapshot, most specific first. Guest RAM mapped from a file
 * on a disk filesystem (a lazily restored VM) cannot be write-protected with userfaultfd;
 * tmpfs and hugetlbfs files can.
 */
async function unsupportedHint(qmp: QmpClient): Promise<string> {
  try {
    for (const memdev of await qmp.execute('query-memdev')) {
      if (!memdev.id) continue;
      const path = await qmp
        .execute('qom-get', { path: `/objects/${memdev.id}`, property: 'mem-path' })
        .catch(() => undefined);
      if (typeof path !== 'string' || path === '') continue;
      const fsType = (await statfs(path).catch(() => undefined))?.type;
      if (fsType !== undefined && fsType !== TMPFS_MAGIC && fsType !== HUGETLBFS_MAGIC) {
        return `guest RAM is mapped from ${path} (a lazy restore?), which userfaultfd cannot write-protect on this filesystem: snapshot a VM restored without --lazy, or keep snapshot files on tmpfs (e.g. /dev/shm)`;
      }
    }
  } catch {
    // fall through to the general hint
  }
  return 'background snapshots need userfaultfd write protection (Linux ≥ 5.7) on anonymous, tmpfs or hugetlbfs RAM; QEMU 7.2 also refuses after a background snapshot of this VM failed (restart the VM)';
}

export async function restoreMigration(qmp: QmpClient, settings: MigrationSettings): Promise<void> {
  const { capabilities, maxBandwidth } = settings.saved;
  if (capabilities.length) {
    // Turn background-snapshot off before anything it conflicts with goes back on.
    const ordered = [...capabilities].sort((a, b) => Number(a.state) - Number(b.state));
    await qmp.execute('migrate-set-capabilities', { capabilities: ordered });
  }
  if (maxBandwidth !== undefined)
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': maxBandwidth });
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
