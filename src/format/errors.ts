/**
 * Errors of the snapshot file format (reading, writing, verifying).
 *
 *   QsnapError                          src/errors.ts
 *   └── SnapshotFileError               QSNAP_FILE_*
 *       ├── QSNAP_FILE_NOT_SNAPSHOT     the last bytes are not a qsnap trailer (truncated, or another file)
 *       ├── QSNAP_FILE_TRUNCATED        a valid trailer, but the file is shorter/longer than it records
 *       ├── QSNAP_FILE_CORRUPT          a checksum failed; details.region names where
 *       ├── QSNAP_FILE_VERSION          written by a newer qsnap (higher major format version)
 *       ├── QSNAP_FILE_IO               the OS refused a read/write (ENOSPC, EACCES, EROFS, EIO…)
 *       ├── QSNAP_FILE_EXISTS           the target path exists and `overwrite` was not given
 *       ├── QSNAP_FILE_INCOMPLETE       finish() while pages of a block were never delivered
 *       └── QSNAP_FILE_USAGE            the caller broke the writer's contract (page out of range,
 *                                       wrong size, used after finish/abort, backpressure ignored)
 *
 * `details.region` of QSNAP_FILE_CORRUPT is one of CorruptRegion.
 */
import path from 'node:path';
import { QsnapError } from '../errors.js';

export type SnapshotFileErrorCode =
  | 'QSNAP_FILE_NOT_SNAPSHOT'
  | 'QSNAP_FILE_TRUNCATED'
  | 'QSNAP_FILE_CORRUPT'
  | 'QSNAP_FILE_VERSION'
  | 'QSNAP_FILE_IO'
  | 'QSNAP_FILE_EXISTS'
  | 'QSNAP_FILE_INCOMPLETE'
  | 'QSNAP_FILE_USAGE';

export type CorruptRegion =
  | 'trailer'
  | 'manifest'
  | 'page-table'
  | 'prologue'
  | 'device-tail'
  | 'ram'
  /** v2: the link pages between RAM blocks, and the other regions of the mapped-ram view. */
  | 'links'
  | 'mapped-ram';

export class SnapshotFileError extends QsnapError {
  declare readonly code: SnapshotFileErrorCode;

  constructor(
    code: SnapshotFileErrorCode,
    message: string,
    options: { hint?: string; cause?: unknown; details?: Record<string, unknown> } = {},
  ) {
    super(code, message, options);
  }
}

export function corrupt(
  file: string,
  region: CorruptRegion,
  what: string,
  details: Record<string, unknown> = {},
): SnapshotFileError {
  return new SnapshotFileError('QSNAP_FILE_CORRUPT', `snapshot ${file} is corrupt: ${what}`, {
    hint: 'the file was modified or damaged after it was written; restore from another copy',
    details: { file, region, ...details },
  });
}

export function notSnapshot(file: string, why: string): SnapshotFileError {
  return new SnapshotFileError(
    'QSNAP_FILE_NOT_SNAPSHOT',
    `${file} is truncated or not a qsnap snapshot (${why})`,
    {
      hint: 'a snapshot ends with a qsnap trailer; an interrupted copy or an unfinished write has none',
      details: { file },
    },
  );
}

const IO_HINTS: Record<string, (dir: string) => string> = {
  ENOSPC: (dir) => `free space in ${dir} or write the snapshot to another directory`,
  EDQUOT: (dir) => `the disk quota for ${dir} is exhausted; free space or raise the quota`,
  EACCES: (dir) => `make ${dir} writable for this user or choose another directory`,
  EPERM: (dir) => `make ${dir} writable for this user or choose another directory`,
  EROFS: (dir) => `${dir} is on a read-only file system; choose a writable directory`,
  EIO: () => 'the storage device reported an I/O error; check the kernel log (dmesg) and the disk',
  EFBIG: (dir) => `the file system of ${dir} cannot hold a file this large; choose another one`,
  ENOENT: (dir) => `check that ${dir} exists`,
  ENOTDIR: (dir) => `check that ${dir} is a directory`,
  EMFILE: () => 'too many open files; raise the limit (ulimit -n)',
};

/** An OS error from fs, as QSNAP_FILE_IO with a hint naming what to do. */
export function ioError(
  op: string,
  file: string,
  err: unknown,
  details: Record<string, unknown> = {},
): SnapshotFileError {
  if (err instanceof SnapshotFileError) return err;
  const errno = (err as NodeJS.ErrnoException | undefined)?.code ?? 'UNKNOWN';
  const reason = err instanceof Error ? err.message : String(err);
  const dir = path.dirname(file);
  return new SnapshotFileError('QSNAP_FILE_IO', `cannot ${op} ${file}: ${reason}`, {
    hint: IO_HINTS[errno]?.(dir) ?? 'check the file system and permissions',
    cause: err,
    details: { file, op, errno, ...details },
  });
}

export function usage(message: string, details: Record<string, unknown> = {}): SnapshotFileError {
  return new SnapshotFileError('QSNAP_FILE_USAGE', message, {
    hint: 'this is a bug in the caller of the snapshot writer',
    details,
  });
}
