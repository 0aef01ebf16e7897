/**
 * readIntoReusedBuffer over a real unix socket: every byte arrives once and in order through
 * the one reused buffer, pause() holds the reads, 'end' comes, and the server it was accepted
 * from closes (its connection count settled although the accepted Socket gave its handle away).
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { READ_BUFFER_BYTES, readIntoReusedBuffer } from '../../src/engine/snapshot/socket-reader.js';

let dir: string | undefined;
afterEach(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
  dir = undefined;
});

/** A listening server whose first connection is read with readIntoReusedBuffer. */
async function serve(onChunk: (chunk: Buffer, reader: Socket) => void) {
  dir = mkdtempSync(join(tmpdir(), 'qsnap-reader-'));
  const path = join(dir, 's.sock');
  let reader!: Socket;
  let server!: Server;
  const accepted = new Promise<Socket>((resolve) => {
    server = createServer({ pauseOnConnect: true }, (socket) => {
      reader = readIntoReusedBuffer(socket, (chunk) => onChunk(chunk, reader));
      resolve(reader);
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return { path, server, accepted };
}

/** Writes `data` in pieces of `piece` bytes, each its own write, then ends. */
async function sendInPieces(path: string, data: Buffer, piece: number): Promise<void> {
  const client = connect(path);
  await new Promise<void>((resolve) => client.once('connect', resolve));
  for (let at = 0; at < data.length; at += piece) {
    if (!client.write(data.subarray(at, at + piece))) await new Promise((r) => client.once('drain', r));
  }
  await new Promise<void>((resolve) => client.end(resolve));
}

describe('readIntoReusedBuffer', () => {
  it('delivers every byte in order through one buffer, then end, and the server closes', async () => {
    const data = randomBytes(8 * 1024 * 1024 + 123);
    const received: Buffer[] = [];
    const buffers = new Set<ArrayBuffer>();
    const { path, server, accepted } = await serve((chunk) => {
      expect(chunk.length).toBeLessThanOrEqual(READ_BUFFER_BYTES);
      buffers.add(chunk.buffer as ArrayBuffer);
      received.push(Buffer.from(chunk)); // the view is only valid during the call
    });
    const sending = sendInPieces(path, data, 4104);
    const reader = await accepted;
    server.close();
    const ended = new Promise<void>((resolve) => reader.once('end', resolve));
    reader.resume();
    await sending;
    await ended;
    expect(Buffer.concat(received).equals(data)).toBe(true);
    expect(buffers.size).toBe(1);
    reader.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  it('reads nothing while paused, and goes on after resume()', async () => {
    let bytes = 0;
    const { path, server, accepted } = await serve((chunk, reader) => {
      bytes += chunk.length;
      reader.pause();
    });
    const data = randomBytes(512 * 1024);
    const sending = sendInPieces(path, data, 4096);
    const reader = await accepted;
    server.close();
    reader.resume();
    while (bytes === 0) await sleep(5);
    const afterFirst = bytes;
    await sleep(50);
    expect(bytes).toBe(afterFirst);
    const ended = new Promise<void>((resolve) => reader.once('end', resolve));
    const resumeEach = setInterval(() => reader.resume(), 1);
    await ended;
    clearInterval(resumeEach);
    await sending;
    expect(bytes).toBe(data.length);
    reader.destroy();
  });
});
