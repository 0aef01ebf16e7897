import type { QmpClient } from '../qmp/index.js';
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
        {
          hint: 'background snapshots need userfaultfd write protection (Linux ≥ 5.7) and RAM that is not hugetlbfs/shared before Linux 5.19',
          cause: err,
        },
      );
    }
  }
  await qmp.execute('migrate-set-parameters', { 'max-bandwidth': want.maxBandwidth ?? UNLIMITED_BANDWIDTH });
  return { saved };
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
