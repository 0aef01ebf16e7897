/**
 * Positioned whole-buffer reads and writes on raw file descriptors, and pipelined reads. The callback API is used (not
 * FileHandle) because the writer may issue tens of thousands of small scattered writes per second.
 */
import fs from 'node:fs';
import { ioError, SnapshotFileError } from './errors.js';
import type { Span } from './layout.js';

/** Writes every byte of `buffers` (contiguous in the file) at `position`, retrying short writes. */
export function pwriteAll(fd: number, buffers: readonly Uint8Array[], position: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let bufs = buffers.filter((b) => b.byteLength > 0);
    let pos = position;
    const step = (): void => {
      if (bufs.length === 0) {
        resolve();
        return;
      }
      const onWritten = (err: NodeJS.ErrnoException | null, written: number): void => {
        if (err) {
          reject(err);
          return;
        }
        if (written === 0) {
          reject(Object.assign(new Error('write returned 0 bytes'), { code: 'EIO' }));
          return;
        }
        pos += written;
        bufs = dropBytes(bufs, written);
        step();
      };
      if (bufs.length === 1) fs.write(fd, bufs[0]!, 0, bufs[0]!.byteLength, pos, onWritten);
      else fs.writev(fd, bufs as Uint8Array[], pos, onWritten);
    };
    step();
  });
}

function dropBytes(bufs: Uint8Array[], n: number): Uint8Array[] {
  let i = 0;
  while (i < bufs.length && n >= bufs[i]!.byteLength) n -= bufs[i++]!.byteLength;
  const rest = bufs.slice(i);
  if (n > 0 && rest.length > 0) rest[0] = rest[0]!.subarray(n);
  return rest;
}

/** Fills `buf` from `position`; resolves with the bytes read (less than buf.length only at end of file). */
export function preadFull(fd: number, buf: Uint8Array, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (): void => {
      if (done === buf.byteLength) {
        resolve(done);
        return;
      }
      fs.read(fd, buf, done, buf.byteLength - done, position + done, (err, n) => {
        if (err) {
          reject(err);
          return;
        }
        if (n === 0) {
          resolve(done);
          return;
        }
        done += n;
        step();
      });
    };
    step();
  });
}

export function fsyncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fsync(fd, (err) => (err ? reject(err) : resolve())));
}

export function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}

/** Makes a rename/link in `dir` durable (POSIX: fsync the directory). */
export async function fsyncDir(dir: string): Promise<void> {
  const fh = await fs.promises.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Reads `items` in order with `depth - 1` reads in flight while the consumer holds one buffer.
 * Items of length 0 are passed through without a read (and without a buffer).
 */
export async function* prefetch<T extends Span>(
  file: string,
  fd: number,
  items: Iterable<T>,
  bufBytes: number,
  depth: number,
): AsyncGenerator<{ item: T; data: Buffer }> {
  const it = items[Symbol.iterator]();
  const bufs = Array.from({ length: depth }, () => Buffer.allocUnsafeSlow(bufBytes));
  const pending: { item: T; data: Buffer; read: Promise<void> }[] = [];
  let next = 0;
  const start = (): void => {
    const r = it.next();
    if (r.done) return;
    if (r.value.length === 0) {
      pending.push({ item: r.value, data: Buffer.alloc(0), read: Promise.resolve() });
      return;
    }
    const data = bufs[next++ % depth]!.subarray(0, r.value.length);
    const read = readExact(file, fd, data, r.value.offset);
    read.catch(() => {});
    pending.push({ item: r.value, data, read });
  };
  for (let i = 0; i < depth - 1; i++) start();
  try {
    while (pending.length > 0) {
      start();
      const cur = pending.shift()!;
      await cur.read;
      yield { item: cur.item, data: cur.data };
    }
  } finally {
    await Promise.allSettled(pending.map((p) => p.read));
  }
}

/** Reads exactly buf.length bytes at `position`: QSNAP_FILE_TRUNCATED at end of file, QSNAP_FILE_IO on error. */
export async function readExact(file: string, fd: number, buf: Buffer, position: number): Promise<void> {
  let n: number;
  try {
    n = await preadFull(fd, buf, position);
  } catch (err) {
    throw ioError('read', file, err);
  }
  if (n < buf.length) {
    throw new SnapshotFileError(
      'QSNAP_FILE_TRUNCATED',
      `${file} ends at ${position + n}, inside a region that runs to ${position + buf.length}`,
      {
        hint: 'the file shrank while it was read, or it was truncated; copy it again',
        details: { file, offset: position + n },
      },
    );
  }
}
