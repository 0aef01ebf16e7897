/**
 * Opening the byte stream to a QMP server: a unix socket path or TCP `host:port`.
 * Knows nothing of QMP; turns connect(2) failures into QmpConnectError reasons.
 */
import { stat } from 'node:fs/promises';
import { createConnection, type Socket } from 'node:net';
import { QmpConnectError } from './errors.js';

export type QmpTarget = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

/**
 * Reads a target as the user wrote it. `unix:PATH` and `tcp:HOST:PORT` are explicit (QEMU's own
 * -qmp syntax); otherwise `HOST:PORT` or `[V6]:PORT` is TCP and anything else is a socket path.
 */
export function parseTarget(target: string): QmpTarget {
  if (target.startsWith('unix:')) return { kind: 'unix', path: target.slice('unix:'.length) };
  const spec = target.startsWith('tcp:') ? target.slice('tcp:'.length) : target;
  const tcp = /^\[([^\]]+)\]:(\d+)$/.exec(spec) ?? /^([^:/]+):(\d+)$/.exec(spec);
  if (tcp?.[1] !== undefined && tcp[2] !== undefined) {
    const port = Number(tcp[2]);
    if (port > 0 && port < 65536) return { kind: 'tcp', host: tcp[1], port };
  }
  return { kind: 'unix', path: target };
}

export function describeTarget(target: QmpTarget): string {
  if (target.kind === 'unix') return target.path;
  return target.host.includes(':') ? `[${target.host}]:${target.port}` : `${target.host}:${target.port}`;
}

/**
 * Connects, or rejects with a QmpConnectError. When `signal` aborts first the socket is destroyed
 * and the promise rejects with `signal.reason`: the caller owns the deadline, so one timeout can
 * cover connect, greeting and negotiation.
 */
export function openTransport(target: QmpTarget, options: { signal?: AbortSignal } = {}): Promise<Socket> {
  const { signal } = options;
  if (signal?.aborted) return Promise.reject(signal.reason);
  return new Promise<Socket>((resolve, reject) => {
    const socket =
      target.kind === 'unix'
        ? createConnection({ path: target.path })
        : createConnection({ host: target.host, port: target.port });
    const cleanup = () => {
      socket.off('connect', onConnect);
      socket.off('error', onError);
      signal?.removeEventListener('abort', onAbort);
    };
    const onConnect = () => {
      cleanup();
      resolve(socket);
    };
    const onError = (err: NodeJS.ErrnoException) => {
      cleanup();
      socket.destroy();
      connectFailure(target, err).then(reject, reject);
    };
    const onAbort = () => {
      cleanup();
      socket.destroy();
      reject(signal?.reason);
    };
    socket.once('connect', onConnect);
    socket.once('error', onError);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** The QmpConnectError for a failed connect(2). */
export async function connectFailure(
  target: QmpTarget,
  err: NodeJS.ErrnoException,
): Promise<QmpConnectError> {
  const where = describeTarget(target);
  const errno = err.code ?? 'UNKNOWN';
  switch (errno) {
    case 'ENOENT':
    case 'ENOTDIR':
    case 'ENOTSOCK':
      return new QmpConnectError(where, 'no-socket', { cause: err, details: { errno } });
    case 'EACCES':
    case 'EPERM':
      return new QmpConnectError(where, 'permission', { cause: err, details: { errno } });
    case 'ETIMEDOUT':
      return new QmpConnectError(where, 'timeout', { cause: err, details: { errno, phase: 'connect' } });
    case 'ECONNREFUSED': {
      // Linux answers ECONNREFUSED both for a stale socket and for a path that is no socket at
      // all (a regular file, a directory): stat tells them apart.
      const fileType = target.kind === 'unix' ? await fileTypeOf(target.path) : 'socket';
      if (fileType !== 'socket') {
        return new QmpConnectError(where, 'no-socket', {
          cause: err,
          message: `${where} is a ${fileType}, not a socket`,
          details: { errno, fileType },
        });
      }
      return new QmpConnectError(where, 'refused', { cause: err, details: { errno } });
    }
    default:
      // EHOSTUNREACH, ENETUNREACH, ENOTFOUND (DNS), ECONNRESET…: nothing listens that we can reach.
      return new QmpConnectError(where, 'refused', { cause: err, details: { errno } });
  }
}

async function fileTypeOf(path: string): Promise<string> {
  try {
    const st = await stat(path);
    if (st.isSocket()) return 'socket';
    if (st.isFile()) return 'regular file';
    if (st.isDirectory()) return 'directory';
    return 'special file';
  } catch {
    return 'socket'; // vanished meanwhile: report the refusal as it was
  }
}
