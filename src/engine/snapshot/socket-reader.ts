import { Socket } from 'node:net';

/** Size of the reused read buffer: a read takes whatever the socket holds, up to this. */
export const READ_BUFFER_BYTES = 1024 * 1024;

/**
 * The accepted connection re-wrapped so that every read lands in one reused buffer, handed to
 * `onChunk` as a view valid only during the call (net.Socket's `onread` option). A background
 * snapshot's stream arrives as ~11 000 small reads per 256 MiB (QEMU flushes per page): the
 * default 'data' path allocates a 64 KiB Buffer for each and runs it through the stream
 * machinery, measured as most of the receiver's CPU besides the parser (docs/benchmarks.md).
 *
 * net.Server has no `onread`, so the accepted socket gives its handle to a new Socket made
 * with one (Node's net.js takes `handle` and `onread` together in the Socket constructor); the
 * old Socket is then destroyed without a handle, which only settles the server's connection
 * count. Events ('end', 'error', 'close'), pause() and resume() work on the returned Socket as
 * on any other. Where the handle is not there to take, the socket is read the default way.
 */
export function readIntoReusedBuffer(accepted: Socket, onChunk: (chunk: Buffer) => void): Socket {
  const holder = accepted as unknown as { _handle: unknown };
  const handle = holder._handle;
  if (!handle || accepted.readableFlowing) {
    accepted.on('data', onChunk);
    return accepted;
  }
  const buffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
  holder._handle = null;
  accepted.destroy();
  return new Socket({
    handle,
    readable: true,
    writable: false,
    onread: {
      buffer,
      callback: (nread: number, buf: Uint8Array) => {
        onChunk((buf as Buffer).subarray(0, nread));
      },
    },
  } as ConstructorParameters<typeof Socket>[0] & { handle: unknown });
}

/** A pipe's read end `fd` (non-blocking), read the same way into one reused buffer. */
export function readFdIntoReusedBuffer(fd: number, onChunk: (chunk: Buffer) => void): Socket {
  const buffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
  return new Socket({
    fd,
    readable: true,
    writable: false,
    onread: {
      buffer,
      callback: (nread: number, buf: Uint8Array) => onChunk((buf as Buffer).subarray(0, nread)),
    },
  } as ConstructorParameters<typeof Socket>[0]);
}
