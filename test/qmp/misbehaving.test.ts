/**
 * QMP peers that misbehave, each a clear coded error and never a hang: a monitor another client
 * holds (as libvirt does) and a QEMU that stops answering, both with a real QEMU; an event
 * flood and a reply larger than any limit from a fake peer (QEMU cannot be made to send those).
 */
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { DEFAULT_MAX_LINE_BYTES } from '../../src/qmp/framing.js';
import { QmpClient } from '../../src/qmp/index.js';
import { monitorHeld, parseProcNetUnix } from '../../src/qmp/monitor-held.js';
import { ensureBuilt } from '../support/build.js';
import { runCli } from '../support/cli.js';
import { failure } from '../support/errors.js';
import { FakePeer } from './fake-peer.js';
import { makeTempDir, type QemuInstance, startQemu } from './qemu-harness.js';

describe('a real QEMU whose monitor is held or that stops answering', () => {
  let temp: Awaited<ReturnType<typeof makeTempDir>>;
  let qemu: QemuInstance;
  const clients: QmpClient[] = [];

  beforeAll(async () => {
    temp = await makeTempDir();
    qemu = await startQemu(temp.dir);
  });

  afterEach(async () => {
    process.kill(qemu.process.pid!, 'SIGCONT'); // never leave it stopped, whatever failed
    await Promise.all(clients.splice(0).map((c) => c.close()));
  });

  afterAll(async () => {
    await qemu?.stop();
    await temp?.remove();
  });

  async function monitorFree(): Promise<void> {
    const { readFileSync } = await import('node:fs');
    for (let i = 0; i < 100; i++) {
      if (monitorHeld(parseProcNetUnix(readFileSync('/proc/net/unix', 'utf8')), qemu.qmpPath) === false)
        return;
      await sleep(20);
    }
    throw new Error('the monitor stays held');
  }

  async function connect(timeoutMs = 5000): Promise<QmpClient> {
    const client = await QmpClient.connect(qemu.qmpPath, { connectTimeoutMs: timeoutMs });
    clients.push(client);
    return client;
  }

  it('a monitor held by another client (libvirt) is refused as busy within a second, not after the timeout', async () => {
    const holder = await connect();
    const started = Date.now();
    const err = await failure(connect(5000));
    const ms = Date.now() - started;
    expect(err).toMatchObject({ code: 'QSNAP_QMP_CONNECT', reason: 'busy', details: { phase: 'greeting' } });
    expect(err.message).toContain('in use by another client');
    expect(err.hint).toContain('-qmp unix:');
    expect(ms).toBeLessThan(1500);
    // Negative control: once the holder leaves, the same monitor serves qsnap.
    await holder.close();
    const next = await connect();
    expect(next.greeting.version.major).toBeGreaterThanOrEqual(7);
  });

  it('qsnap status on a held monitor: one line naming the cause and the fix, exit 1, before the connect timeout', async () => {
    ensureBuilt();
    const holder = await connect();
    const started = Date.now();
    const r = await runCli(['status', '--qmp', qemu.qmpPath], { QSNAP_STATE_DIR: join(temp.dir, 'state') });
    const ms = Date.now() - started;
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain('in use by another client');
    expect(r.stderr).toContain('[QSNAP_QMP_CONNECT]');
    // before 'busy' it waited out the 5 s connect timeout; node's start-up is in both
    expect(ms).toBeLessThan(5000);
    await holder.close();
  });

  it('a QEMU that does not answer (SIGSTOP) fails connect with a coded timeout, not busy', async () => {
    await monitorFree(); // QEMU has seen the last test's client go
    process.kill(qemu.process.pid!, 'SIGSTOP');
    const started = Date.now();
    const err = await failure(connect(1200));
    // connect(2) itself waits when QEMU's backlog is full; else the greeting does not come
    expect(err).toMatchObject({ code: 'QSNAP_QMP_CONNECT', details: { timeoutMs: 1200 } });
    expect(['timeout', 'not-qmp']).toContain(err.reason);
    expect(Date.now() - started).toBeLessThan(3000);
  });

  it('a command QEMU answers too slowly times out with QSNAP_QMP_TIMEOUT; the session recovers', async () => {
    const client = await connect();
    process.kill(qemu.process.pid!, 'SIGSTOP');
    const started = Date.now();
    const err = await failure(client.execute('query-status', undefined, { timeoutMs: 500 }));
    expect(err).toMatchObject({ code: 'QSNAP_QMP_TIMEOUT' });
    expect(Date.now() - started).toBeLessThan(2000);
    process.kill(qemu.process.pid!, 'SIGCONT');
    expect((await client.execute('query-status')).status).toBe('prelaunch');
  });

  it('tells a held monitor from a free one in /proc/net/unix', async () => {
    const { readFileSync } = await import('node:fs');
    const { createConnection } = await import('node:net');
    const held = () => monitorHeld(parseProcNetUnix(readFileSync('/proc/net/unix', 'utf8')), qemu.qmpPath);
    await monitorFree();
    expect(held(), 'nobody connected').toBe(false);
    const holder = await connect();
    expect(held(), 'one client served, none waiting (a silent peer that accepted us looks so)').toBe(false);
    const waiting = createConnection(qemu.qmpPath);
    await new Promise((resolve) => waiting.once('connect', resolve));
    expect(held(), 'one served, one waiting').toBe(true);
    waiting.destroy();
    await holder.close();
    await monitorFree();
    expect(monitorHeld([], qemu.qmpPath), 'no listener under that path: cannot tell').toBeUndefined();
  });
});

describe('a fake peer that floods or sends too much', () => {
  let peer: FakePeer;
  const clients: QmpClient[] = [];

  beforeEach(async () => {
    peer = await FakePeer.start();
  });

  afterEach(async () => {
    await Promise.all(clients.splice(0).map((c) => c.close()));
    await peer.stop();
  });

  async function connected() {
    const connecting = QmpClient.connect(peer.path, { connectTimeoutMs: 2000 });
    const conn = await peer.nextConnection();
    await conn.handshake();
    const client = await connecting;
    clients.push(client);
    return { client, conn };
  }

  it('answers a command through a flood of 200 000 events; a reader that falls behind overflows, bounded', async () => {
    const { client, conn } = await connected();
    const iterator = client.events(undefined, { maxBuffered: 1000 })[Symbol.asyncIterator]();
    let heard = 0;
    client.on('*', () => {
      heard++;
    });
    const pending = client.execute('query-status');
    const request = await conn.receive();
    const event = `${JSON.stringify({ event: 'VSERPORT_CHANGE', data: { id: 'c0', open: true }, timestamp: { seconds: 1, microseconds: 2 } })}\r\n`;
    const burst = event.repeat(10_000);
    const started = Date.now();
    for (let i = 0; i < 20; i++) conn.sendRaw(burst);
    conn.reply(request, { status: 'running', running: true });
    expect((await pending).status).toBe('running');
    expect(Date.now() - started).toBeLessThan(10_000);
    expect(heard).toBe(200_000);
    // the reader that never read holds its 1000 events, then learns it fell behind
    let read = 0;
    const behind = await failure(async () => {
      for (;;) {
        await iterator.next();
        read++;
      }
    });
    expect(read).toBe(1000);
    expect(behind).toMatchObject({ code: 'QSNAP_QMP_EVENT_OVERFLOW' });
    // the session itself is fine
    const again = client.execute('query-status');
    conn.reply(await conn.receive(), { status: 'paused', running: false });
    expect((await again).status).toBe('paused');
  });

  it(`a reply larger than the limit (${DEFAULT_MAX_LINE_BYTES / 2 ** 20} MiB) ends the session with a coded error at once`, async () => {
    const { client, conn } = await connected();
    const failed = failure(client.execute('query-status'));
    await conn.receive();
    const started = Date.now();
    // an endless reply: 64 KiB pieces, no newline, until the client hangs up
    const piece = Buffer.alloc(64 * 1024, 0x61);
    conn.sendRaw('{"return": {"status": "');
    let sent = 0;
    while (!conn.socket.destroyed && sent < 4 * DEFAULT_MAX_LINE_BYTES) {
      conn.sendRaw(piece);
      sent += piece.length;
      if (sent % (2 * 2 ** 20) === 0) await sleep(1);
    }
    const err = await failed;
    expect(err).toMatchObject({ code: 'QSNAP_QMP_DISCONNECTED' });
    expect(err.cause).toMatchObject({ code: 'QSNAP_QMP_PROTOCOL', details: { reason: 'line-too-long' } });
    expect(Date.now() - started).toBeLessThan(5000);
    expect(client.state).not.toBe('running');
  });
});
