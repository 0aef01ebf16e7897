import { statfs } from 'node:fs/promises';
import type { QmpClient } from '../qmp/index.js';
import { SnapshotError } from './errors.js';

/**
 * Why QEMU refuses a background snapshot, told apart: guest RAM userfaultfd cannot
 * write-protect (a lazily restored VM maps RAM privately from a file on a disk filesystem,
 * which the kernel's uffd-wp does not cover: only anonymous, shmem/tmpfs and hugetlbfs memory)
 * is a refusal qsnap answers with another strategy (live-precopy); every other refusal stays an
 * error with a hint.
 */

/** statfs f_type of tmpfs and hugetlbfs: file-backed RAM userfaultfd can write-protect. */
export const TMPFS_MAGIC = 0x01021994;
const HUGETLBFS_MAGIC = 0x958458f6;

/**
 * QEMU's words when a RAM block fails its userfaultfd-wp probe (migration/options.c 10.0,
 * migration.c 7.2: migrate_caps_check → ram_write_tracking_compatible). QEMU 7.2 says the same
 * when an earlier failed background snapshot left RAM registered, so the words alone are not
 * enough: the backing file must be seen too.
 */
const RAM_REFUSAL = /not compatible with guest memory configuration/;

/** `details.reason` of the refusal qsnap answers with live-precopy. */
export const RAM_NOT_WRITE_PROTECTABLE = 'ram-not-write-protectable';

/** The QSNAP_SNAPSHOT_UNSUPPORTED error for a refused `migrate-set-capabilities`, its cause named. */
export async function refusalError(qmp: QmpClient, err: unknown): Promise<SnapshotError> {
  const message = `QEMU refused the snapshot settings: ${(err as Error).message}`;
  const memPath = RAM_REFUSAL.test((err as Error).message) ? await unprotectableRamFile(qmp) : undefined;
  if (memPath !== undefined) {
    return new SnapshotError('QSNAP_SNAPSHOT_UNSUPPORTED', message, {
      hint: `guest RAM is mapped from ${memPath} (a lazy restore?), which userfaultfd cannot write-protect on this filesystem`,
      cause: err,
      details: { reason: RAM_NOT_WRITE_PROTECTABLE, memPath },
    });
  }
  return new SnapshotError('QSNAP_SNAPSHOT_UNSUPPORTED', message, {
    hint: 'background snapshots need userfaultfd write protection (Linux ≥ 5.7) on anonymous, tmpfs or hugetlbfs RAM; QEMU 7.2 also refuses after a background snapshot of this VM failed (restart the VM)',
    cause: err,
  });
}

/** The refusal is QEMU's RAM-cannot-be-write-protected one, with the file qsnap found behind it. */
export function isRamNotWriteProtectable(err: unknown): err is SnapshotError {
  return (
    err instanceof SnapshotError &&
    err.code === 'QSNAP_SNAPSHOT_UNSUPPORTED' &&
    err.details['reason'] === RAM_NOT_WRITE_PROTECTABLE
  );
}

/**
 * The mem-path of a memory backend on a filesystem userfaultfd cannot write-protect, if any.
 * The path is QEMU's, looked at from here: qsnap and QEMU must share the filesystem view (as
 * they do for disks and sockets); a path qsnap cannot stat counts as not found.
 */
async function unprotectableRamFile(qmp: QmpClient): Promise<string | undefined> {
  for (const path of await ramFiles(qmp)) {
    const fsType = (await statfs(path).catch(() => undefined))?.type;
    if (fsType !== undefined && fsType !== TMPFS_MAGIC && fsType !== HUGETLBFS_MAGIC) return path;
  }
  return undefined;
}

/** The files guest RAM is mapped from (memory backends with a mem-path); none for anonymous RAM. */
export async function ramFiles(qmp: QmpClient): Promise<string[]> {
  const files: string[] = [];
  try {
    for (const memdev of await qmp.execute('query-memdev')) {
      if (!memdev.id) continue;
      const path = await qmp
        .execute('qom-get', { path: `/objects/${memdev.id}`, property: 'mem-path' })
        .catch(() => undefined);
      if (typeof path === 'string' && path !== '') files.push(path);
    }
  } catch {
    // not found: none known
  }
  return files;
}
