/**
 * Protocol corner cases against a fake QMP peer (fake-peer.ts).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { QmpClient, type QmpClientOptions, type QmpEvent } from '../../src/qmp/index.js';
import { failure } from '../support/errors.js';
import { FakePeer, GREETING, type PeerConnection } from './fake-peer.js';

let peer: FakePeer;
const clients: QmpClient[] = [];

beforeEach(async () => {
  peer = await FakePeer.start();
});

afterEach(async () => {
  await Promise.all(clients.splice(0).map((c) => c.close()));
  await peer.stop();
});

/** A log that records what the client said, to check drops are reported. */
function recordingLogger() {
  const lines: { level: string; message: string; fields?: Record<string, unknown> }[] = [];
  const at = (level: string) => (message: string, fields?: Record<string, unknown>) => {
    lines.push({ level, message, ...(fields ? { fields } : {}) });
  };
  return { lines, logger: { debug: at('debug'), warn: at('warn'), error: at('error') } };
}

async function connected(
  options: QmpClientOptions = {},
): Promise<{ client: QmpClient; conn: PeerConnection }> {
  const connecting = QmpClient.connect(peer.path, { connectTimeoutMs: 2000, ...options });
  const conn = await peer.nextConnection();
  await conn.handshake();
  const client = await connecting;
  clients.push(client);
  return { client, conn };
}

/** Settles a promise into a value or the error, for asserting on both sides. */
function outcome<T>(p: Promise<T>): Promise<{ value?: T; error?: unknown }> {
  return p.then(
    (value) => ({ value }),
    (error: unknown) => ({ error }),
  );
}

/** Handles that a failed connect could leak: sockets and timers. */
function leakableHandles(): number {
  return process.getActiveResourcesInfo().filter((r) => r === 'PipeWrap' || r === 'Timeout').length;
}

describe('handshake', () => {
  it('reads the greeting, negotiates, and exposes version and capabilities', async () => {
    const connecting = QmpClient.connect(peer.path, { connectTimeoutMs: 2000 });
    const conn = await peer.nextConnection();
    conn.send(GREETING);
    const negotiation = await conn.receive();
    expect(negotiation).toEqual({ execute: 'qmp_capabilities', id: 0 });
    conn.reply(negotiation);
    const client = await connecting;
    clients.push(client);
    expect(client.state).toBe('running');
    expect(client.greeting).toEqual({
      version: { major: 7, minor: 2, micro: 22 },
      package: 'fake',
      capabilities: ['oob'],
    });
    expect(client.target).toBe(peer.path);
  });

  it('fails with not-qmp when the peer stays silent, after the timeout, leaving nothing behind', async () => {
    const before = leakableHandles();
    const started = Date.now();
    const connecting = outcome(QmpClient.connect(peer.path, { connectTimeoutMs: 200 }));
    const conn = await peer.nextConnection();
    const { error } = await connecting;
    expect(error).toMatchObject({
      code: 'QSNAP_QMP_CONNECT',
      reason: 'not-qmp',
      details: { phase: 'greeting' },
    });
    expect(Date.now() - started).toBeGreaterThanOrEqual(190);
    await conn.closed; // the client hung up
    expect(leakableHandles()).toBeLessThanOrEqual(before);
  });

  it('fails fast with not-qmp when the peer sends a non-QMP banner', async () => {
    const started = Date.now();
    const connecting = outcome(QmpClient.connect(peer.path, { connectTimeoutMs: 5000 }));
    const conn = await peer.nextConnection();
    conn.sendRaw("QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ");
    const { error } = await connecting;
    expect(error).toMatchObject({ code: 'QSNAP_QMP_CONNECT', reason: 'not-qmp' });
    expect((error as Error).cause).toMatchObject({ code: 'QSNAP_QMP_PROTOCOL', reason: 'malformed-json' });
    expect(Date.now() - started).toBeLessThan(2000);
    await conn.closed;
  });

  it('fails with not-qmp on endless bytes without a newline', async () => {
    const connecting = outcome(QmpClient.connect(peer.path, { connectTimeoutMs: 5000 }));
    const conn = await peer.nextConnection();
    conn.sendRaw(Buffer.alloc(100 * 1024, 'x'));
    const { error } = await connecting;
    expect(error).toMatchObject({ code: 'QSNAP_QMP_CONNECT', reason: 'not-qmp' });
  });

  it('fails with not-qmp when the first message is JSON but no greeting', async () => {
    const connecting = outcome(QmpClient.connect(peer.path, { connectTimeoutMs: 5000 }));
    const conn = await peer.nextConnection();
    conn.send({ return: {}, id: 0 });
    expect((await connecting).error).toMatchObject({ code: 'QSNAP_QMP_CONNECT', reason: 'not-qmp' });
  });

  it('fails with not-qmp, keeping QEMU class and desc, when qmp_capabilities is refused', async () => {
    const connecting = outcome(QmpClient.connect(peer.path, { connectTimeoutMs: 2000 }));
    const conn = await peer.nextConnection();
    conn.send(GREETING);
    const negotiation = await conn.receive();
    conn.replyError(
      negotiation,
      'CommandNotFound',
      'Capabilities negotiation is already complete, command ignored',
    );
    const { error } = await connecting;
    expect(error).toMatchObject({
      code: 'QSNAP_QMP_CONNECT',
      reason: 'not-qmp',
      details: { phase: 'capabilities', errorClass: 'CommandNotFound' },
    });
    expect((error as Error).cause).toMatchObject({
      code: 'QSNAP_QMP_COMMAND',
      command: 'qmp_capabilities',
      errorClass: 'CommandNotFound',
    });
    await conn.closed;
  });

  it('fails with timeout when qmp_capabilities gets no reply', async () => {
    const connecting = outcome(QmpClient.connect(peer.path, { connectTimeoutMs: 200 }));
    const conn = await peer.nextConnection();
    conn.send(GREETING);
    await conn.receive();
    expect((await connecting).error).toMatchObject({
      code: 'QSNAP_QMP_CONNECT',
      reason: 'timeout',
      details: { phase: 'capabilities' },
    });
    await conn.closed;
  });

  it('fails with not-qmp when the peer hangs up mid-handshake', async () => {
    const connecting = outcome(QmpClient.connect(peer.path, { connectTimeoutMs: 2000 }));
    const conn = await peer.nextConnection();
    conn.send(GREETING);
    await conn.receive();
    conn.destroy();
    expect((await connecting).error).toMatchObject({ code: 'QSNAP_QMP_CONNECT', reason: 'not-qmp' });
  });

  it('starts the read loop with messages that came in the same chunk as the negotiation reply', async () => {
    const { lines, logger } = recordingLogger();
    const connecting = QmpClient.connect(peer.path, { connectTimeoutMs: 2000, logger });
    const conn = await peer.nextConnection();
    conn.send(GREETING);
    await conn.receive();
    // The negotiation reply and a stray reply in one write: the read loop must route the second.
    conn.sendRaw('{"return": {}, "id": 0}\r\n{"return": {}, "id": 4242}\r\n');
    const client = await connecting;
    clients.push(client);
    const status = client.execute('query-status');
    conn.reply(await conn.receive(), { status: 'running', running: true });
    expect(await status).toEqual({ status: 'running', running: true });
    expect(lines.filter((l) => l.level === 'warn').map((l) => l.fields?.['id'])).toEqual([4242]);
  });
});

describe('messages and routing', () => {
  it('reassembles a reply and an event delivered one byte per write', async () => {
    const { client, conn } = await connected();
    const stopped = client.waitFor('STOP');
    const status = client.execute('query-status');
    const request = await conn.receive();
    const bytes =
      `{"timestamp": {"seconds": 1795295163, "microseconds": 140891}, "event": "STOP"}\r\n` +
      `{"return": {"status": "paused", "singlestep": false, "running": false}, "id": ${JSON.stringify(request.id)}}\r\n`;
    await conn.sendChunked(`${bytes}`, 1);
    expect(await status).toEqual({ status: 'paused', singlestep: false, running: false });
    expect((await stopped).timestampUs).toBe(1795295163140891);
  });

  it('routes an event and a reply split into two writes at every byte boundary', async () => {
    const { client, conn } = await connected();
    const stops: number[] = [];
    client.on('STOP', (e) => stops.push(e.timestampUs));
    for (let cut = 1; ; cut++) {
      const reply = client.execute('query-kvm');
      const request = await conn.receive();
      const bytes = Buffer.from(
        `{"timestamp": {"seconds": 1, "microseconds": ${cut}}, "event": "STOP"}\r\n` +
          `{"return": {"enabled": false, "present": true}, "id": ${JSON.stringify(request.id)}}\r\n`,
      );
      if (cut >= bytes.length) {
        conn.sendRaw(bytes);
        await reply;
        break;
      }
      conn.sendRaw(bytes.subarray(0, cut));
      await sleep(1);
      conn.sendRaw(bytes.subarray(cut));
      expect(await reply).toEqual({ enabled: false, present: true });
      expect(stops.at(-1)).toBe(1_000_000 + cut);
    }
    expect(stops.length).toBeGreaterThan(100);
  });

  it('splits several messages coalesced in one write', async () => {
    const { client, conn } = await connected();
    const seen: string[] = [];
    client.on('*', (e) => seen.push(e.event));
    const a = client.execute('query-name');
    const b = client.execute('query-kvm');
    const ra = await conn.receive();
    const rb = await conn.receive();
    conn.sendRaw(
      [
        JSON.stringify({ event: 'RESUME', timestamp: { seconds: 1, microseconds: 1 } }),
        JSON.stringify({ return: { name: 'vm' }, id: ra.id }),
        JSON.stringify({ event: 'STOP', timestamp: { seconds: 1, microseconds: 2 } }),
        JSON.stringify({ return: { enabled: false, present: true }, id: rb.id }),
        '',
      ].join('\r\n'),
    );
    expect(await a).toEqual({ name: 'vm' });
    expect(await b).toEqual({ enabled: false, present: true });
    expect(seen).toEqual(['RESUME', 'STOP']);
  });

  it('delivers events that arrive between a command and its reply, before the reply resolves', async () => {
    const { client, conn } = await connected();
    const order: string[] = [];
    client.on('STOP', (e) => order.push(`event ${e.event} ${e.timestampUs}`));
    const stop = client.execute('stop').then(() => order.push('reply'));
    const request = await conn.receive();
    expect(request).toMatchObject({ execute: 'stop' });
    expect(request).not.toHaveProperty('arguments');
    conn.event('STOP', undefined, 1795295163, 140891);
    conn.reply(request);
    await stop;
    expect(order).toEqual(['event STOP 1795295163140891', 'reply']);
  });

  it('rejects a command with QEMU error class and desc kept', async () => {
    const { client, conn } = await connected();
    const result = client.execute('qom-get', { path: '/nope', property: 'type' });
    const request = await conn.receive();
    expect(request.arguments).toEqual({ path: '/nope', property: 'type' });
    conn.replyError(request, 'DeviceNotFound', "Device '/nope' not found");
    expect(await failure(result)).toMatchObject({
      code: 'QSNAP_QMP_COMMAND',
      command: 'qom-get',
      errorClass: 'DeviceNotFound',
      desc: "Device '/nope' not found",
    });
    expect(client.state).toBe('running');
  });

  it('routes out-of-order replies to concurrent commands by id', async () => {
    const { client, conn } = await connected();
    const names = ['vm-a', 'vm-b', 'vm-c', 'vm-d'];
    const results = names.map(() => client.executeRaw('query-name'));
    const requests = await Promise.all(names.map(() => conn.receive()));
    expect(new Set(requests.map((r) => r.id)).size).toBe(4);
    for (const i of [2, 0, 3, 1]) conn.reply(requests[i]!, { name: names[i] });
    expect(await Promise.all(results)).toEqual(names.map((name) => ({ name })));
  });

  it('rejects a reply failing its schema with a protocol error naming the command, and keeps running', async () => {
    const { client, conn } = await connected();
    const status = client.execute('query-status');
    conn.reply(await conn.receive(), { status: 'running', running: 'yes' });
    const err = await failure(status);
    expect(err).toMatchObject({ code: 'QSNAP_QMP_PROTOCOL', reason: 'bad-reply', command: 'query-status' });
    expect((err['details'] as Record<string, unknown>)['issues']).toMatch(/^running: /);
    // The session is still usable.
    const again = client.execute('query-status');
    conn.reply(await conn.receive(), { status: 'running', running: true });
    expect(await again).toMatchObject({ running: true });
  });

  it('executeRaw returns the reply unvalidated', async () => {
    const { client, conn } = await connected();
    const raw = client.executeRaw('query-status', { any: 1 });
    const request = await conn.receive();
    expect(request).toMatchObject({ execute: 'query-status', arguments: { any: 1 } });
    conn.reply(request, { running: 'yes' });
    expect(await raw).toEqual({ running: 'yes' });
  });

  it('logs and drops a reply with an unknown id', async () => {
    const { lines, logger } = recordingLogger();
    const { client, conn } = await connected({ logger });
    const pending = client.execute('query-name');
    const request = await conn.receive();
    conn.send({ return: { name: 'stray' }, id: 999 });
    conn.send({ return: { name: 'stray' }, id: 'someone-else' });
    conn.reply(request, { name: 'mine' });
    expect(await pending).toEqual({ name: 'mine' });
    expect(
      lines.filter((l) => l.level === 'warn' && /unknown id/.test(l.message)).map((l) => l.fields?.['id']),
    ).toEqual([999, 'someone-else']);
    expect(client.state).toBe('running');
  });

  it('treats malformed JSON as fatal: pending commands reject with one disconnect error keeping the cause', async () => {
    const { client, conn } = await connected();
    const first = client.execute('query-status');
    const second = client.execute('query-kvm');
    await conn.receive();
    await conn.receive();
    conn.sendRaw('{"return": {]\r\n');
    const [a, b] = await Promise.all([failure(first), failure(second)]);
    expect(a).toMatchObject({ code: 'QSNAP_QMP_DISCONNECTED', reason: 'protocol-error' });
    expect(a).toBe(b);
    expect((a as unknown as Error).cause).toMatchObject({
      code: 'QSNAP_QMP_PROTOCOL',
      reason: 'malformed-json',
    });
    await conn.closed;
    expect(client.state).toBe('disconnected');
    expect(await failure(client.execute('query-status'))).toMatchObject({ code: 'QSNAP_QMP_DISCONNECTED' });
  });

  it('treats an id-less error reply as fatal', async () => {
    const { client, conn } = await connected();
    const pending = client.execute('query-status');
    await conn.receive();
    conn.send({ error: { class: 'GenericError', desc: 'JSON parse error, invalid keyword' } });
    const err = await failure(pending);
    expect(err).toMatchObject({ code: 'QSNAP_QMP_DISCONNECTED', reason: 'protocol-error' });
    expect((err as unknown as Error).cause).toMatchObject({
      code: 'QSNAP_QMP_PROTOCOL',
      reason: 'id-less-reply',
    });
    expect(client.disconnectError).toBe(err);
  });

  it('treats a second greeting as fatal', async () => {
    const { client, conn } = await connected();
    const pending = client.execute('query-status');
    await conn.receive();
    conn.send(GREETING);
    expect(await failure(pending)).toMatchObject({
      code: 'QSNAP_QMP_DISCONNECTED',
      reason: 'protocol-error',
    });
    expect(client.state).not.toBe('running');
  });

  it('rejects every pending command when the peer closes mid-command', async () => {
    const { client, conn } = await connected();
    const disconnected: unknown[] = [];
    client.onDisconnect((e) => disconnected.push(e));
    const pending = [client.execute('query-status'), client.execute('cont'), client.executeRaw('x')];
    for (const _ of pending) await conn.receive();
    conn.end();
    const errors = await Promise.all(pending.map(failure));
    expect(errors[0]).toMatchObject({ code: 'QSNAP_QMP_DISCONNECTED', reason: 'peer-closed' });
    expect(errors[1]).toBe(errors[0]);
    expect(errors[2]).toBe(errors[0]);
    expect(disconnected).toEqual([errors[0]]);
    await client.close();
    expect(client.state).toBe('disconnected');
  });

  it('treats a reset connection (how QEMU often exits) as peer-closed, keeping the errno', async () => {
    const { client, conn } = await connected();
    // A request too big to be read at once: closing with unread bytes resets the connection.
    conn.socket.pause();
    const pending = client.executeRaw('x-big', { blob: 'a'.repeat(4 * 1024 * 1024) });
    await sleep(50);
    conn.destroy();
    const err = await failure(pending);
    expect(err).toMatchObject({ code: 'QSNAP_QMP_DISCONNECTED', reason: 'peer-closed' });
    expect((err as unknown as Error).cause).toMatchObject({ code: 'ECONNRESET' });
  });

  it('reports a message cut short by the peer closing as a truncation', async () => {
    const { client, conn } = await connected();
    const pending = client.execute('query-status');
    await conn.receive();
    conn.sendRaw('{"return": {"status": "run');
    await sleep(5);
    conn.end();
    const err = await failure(pending);
    expect(err).toMatchObject({ code: 'QSNAP_QMP_DISCONNECTED', reason: 'protocol-error' });
    expect((err as unknown as Error).cause).toMatchObject({
      code: 'QSNAP_QMP_PROTOCOL',
      reason: 'truncated',
    });
  });

  it('times out a command, then drops its late reply and keeps working', async () => {
    const { lines, logger } = recordingLogger();
    const { client, conn } = await connected({ logger, commandTimeoutMs: 100 });
    const slow = client.execute('query-status');
    const request = await conn.receive();
    expect(await failure(slow)).toMatchObject({
      code: 'QSNAP_QMP_TIMEOUT',
      timeoutMs: 100,
      details: { command: 'query-status' },
    });
    conn.reply(request, { status: 'running', running: true }); // late
    const next = client.execute('query-kvm', undefined, { timeoutMs: 2000 });
    conn.reply(await conn.receive(), { enabled: false, present: false });
    expect(await next).toEqual({ enabled: false, present: false });
    expect(lines.some((l) => l.level === 'debug' && /late reply to query-status/.test(l.message))).toBe(true);
    expect(lines.some((l) => l.level === 'warn')).toBe(false);
  });

  it('stops waiting on abort; an aborted signal sends nothing', async () => {
    const { client, conn } = await connected();
    const controller = new AbortController();
    const pending = client.execute('query-status', undefined, { signal: controller.signal });
    await conn.receive();
    controller.abort(new Error('user gave up'));
    expect((await failure(pending))['message']).toBe('user gave up');
    const already = client.execute('query-kvm', {}, { signal: AbortSignal.abort() });
    expect((await failure(already))['name']).toBe('AbortError');
    // Nothing was sent for the aborted call: the next request the peer sees is this one.
    const probe = client.executeRaw('probe');
    const request = await conn.receive();
    expect(request).toMatchObject({ execute: 'probe' });
    conn.reply(request);
    await probe;
  });

  it('close() is idempotent and rejects pending commands', async () => {
    const { client, conn } = await connected();
    const pending = outcome(client.execute('query-status'));
    await conn.receive();
    const closing = [client.close(), client.close()];
    await Promise.all(closing);
    await client.close();
    expect(client.state).toBe('disconnected');
    expect((await pending).error).toMatchObject({
      code: 'QSNAP_QMP_DISCONNECTED',
      reason: 'closed-by-client',
    });
    await conn.closed;
    expect(await failure(client.executeRaw('x'))).toMatchObject({ code: 'QSNAP_QMP_DISCONNECTED' });
  });
});

describe('events', () => {
  it('subscribes by name and by "*", and unsubscribes', async () => {
    const { client, conn } = await connected();
    const stops: QmpEvent[] = [];
    const all: string[] = [];
    const offStop = client.on('STOP', (e) => stops.push(e));
    client.on('*', (e) => all.push(e.event));
    conn.event('STOP');
    conn.event('MIGRATION', { status: 'setup' });
    await sleep(20);
    offStop();
    conn.event('STOP');
    const barrier = client.waitFor('RESUME');
    conn.event('RESUME');
    await barrier;
    expect(stops).toHaveLength(1);
    expect(stops[0]).toMatchObject({
      event: 'STOP',
      data: {},
      timestamp: { seconds: 1_700_000_000, microseconds: 123_456 },
      timestampUs: 1_700_000_000_123_456,
    });
    expect(all).toEqual(['STOP', 'MIGRATION', 'STOP', 'RESUME']);
  });

  it('types and validates known events; drops one failing its schema with a warning', async () => {
    const { lines, logger } = recordingLogger();
    const { client, conn } = await connected({ logger });
    const migrations: string[] = [];
    client.on('MIGRATION', (e) => migrations.push(e.data.status));
    conn.event('MIGRATION', { status: 'active' });
    conn.event('MIGRATION', { state: 'oops' });
    conn.event('MIGRATION', { status: 'completed' });
    const barrier = client.waitFor('MIGRATION', (e) => e.data.status === 'completed');
    await barrier;
    expect(migrations).toEqual(['active', 'completed']);
    expect(lines.filter((l) => l.level === 'warn').map((l) => l.fields?.['event'])).toEqual(['MIGRATION']);
    expect(client.state).toBe('running');
  });

  it('buffers events in an async iterator that ends on disconnect', async () => {
    const { client, conn } = await connected();
    const iterator = client.events(['STOP', 'RESUME']);
    conn.event('STOP');
    conn.event('SHUTDOWN', { guest: false, reason: 'host-qmp-quit' });
    conn.event('RESUME');
    await sleep(20); // buffered while nobody reads
    conn.end();
    const seen: string[] = [];
    for await (const event of iterator) seen.push(event.event);
    expect(seen).toEqual(['STOP', 'RESUME']);
    // An iterator opened after the end is finished at once.
    expect(await client.events().next()).toEqual({ done: true, value: undefined });
  });

  it('ends an iterator left by break, and fails one that falls too far behind', async () => {
    const { client, conn } = await connected();
    const slow = client.events('STOP', { maxBuffered: 2 });
    const broken = client.events();
    for (let i = 0; i < 4; i++) conn.event('STOP', undefined, 1, i);
    for await (const _ of broken) break;
    await sleep(20);
    expect((await slow.next()).value?.timestamp.microseconds).toBe(0);
    expect((await slow.next()).value?.timestamp.microseconds).toBe(1);
    expect(await failure(slow.next())).toMatchObject({ code: 'QSNAP_QMP_EVENT_OVERFLOW' });
    expect(await slow.next()).toEqual({ done: true, value: undefined });
  });

  it('waitFor matches a predicate, times out, and rejects on disconnect', async () => {
    const { client, conn } = await connected();
    const ready = client.waitFor('JOB_STATUS_CHANGE', (e) => e.data.id === 'c1' && e.data.status === 'ready');
    conn.event('JOB_STATUS_CHANGE', { id: 'c0', status: 'ready' });
    conn.event('JOB_STATUS_CHANGE', { id: 'c1', status: 'running' });
    conn.event('JOB_STATUS_CHANGE', { id: 'c1', status: 'ready' });
    expect((await ready).data).toEqual({ id: 'c1', status: 'ready' });

    const started = Date.now();
    expect(await failure(client.waitFor('RESUME', undefined, { timeoutMs: 100 }))).toMatchObject({
      code: 'QSNAP_QMP_TIMEOUT',
      details: { event: 'RESUME' },
    });
    expect(Date.now() - started).toBeGreaterThanOrEqual(90);

    const never = client.waitFor('RESUME');
    conn.destroy();
    expect(await failure(never)).toMatchObject({ code: 'QSNAP_QMP_DISCONNECTED', reason: 'peer-closed' });
    expect(await failure(client.waitFor('STOP'))).toMatchObject({ code: 'QSNAP_QMP_DISCONNECTED' });
  });
});
