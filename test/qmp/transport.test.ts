import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { QmpClient } from '../../src/qmp/index.js';
import { connectFailure, parseTarget } from '../../src/qmp/transport.js';
import { isRoot } from '../support/env.js';
import { GREETING } from './fake-peer.js';

let dir: string;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qsnap-qmp-transport-'));
});

afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function connectError(target: string): Promise<Record<string, unknown>> {
  try {
    const client = await QmpClient.connect(target, { connectTimeoutMs: 2000 });
    await client.close();
  } catch (err) {
    return err as Record<string, unknown>;
  }
  throw new Error('expected connect to fail');
}

/** A socket file nobody listens on, as a QEMU killed with SIGKILL leaves behind. */
async function staleSocket(path: string): Promise<void> {
  const child = spawn(
    process.execPath,
    ['-e', `require('net').createServer().listen(${JSON.stringify(path)}, () => console.log('ready'))`],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  await once(child.stdout, 'data');
  child.kill('SIGKILL');
  await once(child, 'exit');
}

describe('parseTarget', () => {
  it.each([
    ['/run/qemu/qmp.sock', { kind: 'unix', path: '/run/qemu/qmp.sock' }],
    ['qmp.sock', { kind: 'unix', path: 'qmp.sock' }],
    ['./a:1', { kind: 'unix', path: './a:1' }],
    ['unix:/tmp/x:1', { kind: 'unix', path: '/tmp/x:1' }],
    ['localhost:4444', { kind: 'tcp', host: 'localhost', port: 4444 }],
    ['127.0.0.1:4444', { kind: 'tcp', host: '127.0.0.1', port: 4444 }],
    ['[::1]:4444', { kind: 'tcp', host: '::1', port: 4444 }],
    ['tcp:10.0.0.2:5555', { kind: 'tcp', host: '10.0.0.2', port: 5555 }],
    ['host:99999', { kind: 'unix', path: 'host:99999' }],
  ])('%s', (target, expected) => {
    expect(parseTarget(target)).toEqual(expected);
  });
});

describe('connect failures', () => {
  it('a missing path is no-socket', async () => {
    expect(await connectError(join(dir, 'absent.sock'))).toMatchObject({
      code: 'QSNAP_QMP_CONNECT',
      reason: 'no-socket',
      details: { errno: 'ENOENT' },
    });
  });

  it('a path through a regular file is no-socket', async () => {
    await writeFile(join(dir, 'file'), 'x');
    expect(await connectError(join(dir, 'file', 'qmp.sock'))).toMatchObject({
      reason: 'no-socket',
      details: { errno: 'ENOTDIR' },
    });
  });

  it('a regular file or a directory is no-socket, naming what it is', async () => {
    await writeFile(join(dir, 'file'), 'x');
    await mkdir(join(dir, 'sub'));
    expect(await connectError(join(dir, 'file'))).toMatchObject({
      code: 'QSNAP_QMP_CONNECT',
      reason: 'no-socket',
      details: { errno: 'ECONNREFUSED', fileType: 'regular file' },
    });
    expect(await connectError(join(dir, 'sub'))).toMatchObject({
      reason: 'no-socket',
      details: { fileType: 'directory' },
    });
  });

  it('a stale socket file is refused', async () => {
    const path = join(dir, 'stale.sock');
    await staleSocket(path);
    expect(await connectError(path)).toMatchObject({
      code: 'QSNAP_QMP_CONNECT',
      reason: 'refused',
      details: { errno: 'ECONNREFUSED' },
    });
  });

  it('a closed TCP port is refused', async () => {
    const server = createServer();
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const { port } = server.address() as { port: number };
    server.close();
    await once(server, 'close');
    expect(await connectError(`127.0.0.1:${port}`)).toMatchObject({
      code: 'QSNAP_QMP_CONNECT',
      reason: 'refused',
      details: { target: `127.0.0.1:${port}` },
    });
  });

  it.skipIf(isRoot)('a socket without permission is permission', async () => {
    const path = join(dir, 'private.sock');
    const server = createServer().listen(path);
    await once(server, 'listening');
    const { chmod } = await import('node:fs/promises');
    await chmod(path, 0o000);
    try {
      expect(await connectError(path)).toMatchObject({ reason: 'permission' });
    } finally {
      server.close();
    }
  });

  it.each([
    ['EACCES', 'permission'],
    ['EPERM', 'permission'],
    ['ENOENT', 'no-socket'],
    ['ENOTSOCK', 'no-socket'],
    ['ETIMEDOUT', 'timeout'],
    ['EHOSTUNREACH', 'refused'],
  ])('maps %s to %s', async (errno, reason) => {
    const err = Object.assign(new Error(errno), { code: errno });
    const mapped = await connectFailure({ kind: 'tcp', host: 'h', port: 1 }, err);
    expect(mapped).toMatchObject({ code: 'QSNAP_QMP_CONNECT', reason, details: { errno } });
    expect(mapped.cause).toBe(err);
    expect(mapped.hint).toBeTruthy();
  });
});

describe('TCP', () => {
  let server: Server | undefined;
  afterEach(() => {
    server?.close();
    server = undefined;
  });

  it('connects to host:port and runs a command', async () => {
    server = createServer((socket) => {
      socket.setEncoding('utf8');
      socket.write(`${JSON.stringify(GREETING)}\r\n`);
      let buffered = '';
      socket.on('data', (text: string) => {
        buffered += text;
        for (let nl = buffered.indexOf('\n'); nl !== -1; nl = buffered.indexOf('\n')) {
          const request = JSON.parse(buffered.slice(0, nl)) as { execute: string; id: number };
          buffered = buffered.slice(nl + 1);
          const value = request.execute === 'query-name' ? { name: 'tcp-vm' } : {};
          socket.write(`${JSON.stringify({ return: value, id: request.id })}\r\n`);
        }
      });
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const { port } = server.address() as { port: number };
    const client = await QmpClient.connect(`127.0.0.1:${port}`, { connectTimeoutMs: 2000 });
    try {
      expect(client.target).toBe(`127.0.0.1:${port}`);
      expect(await client.execute('query-name')).toEqual({ name: 'tcp-vm' });
    } finally {
      await client.close();
    }
  });
});
