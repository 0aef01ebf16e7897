/**
 * `qsnap serve` with real guests, one daemon (--max-streams 1) for the file: the security of the
 * upgrade, the contract (attach, status, snapshot, list, restore), two VMs' snapshots asked at
 * once running one after the other with their progress in order, a client that disconnects
 * mid-snapshot, malformed frames, a small load while a snapshot streams, a VM whose QEMU is
 * killed while operations wait, and the daemon SIGKILLed mid-snapshot and started again.
 */
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { connect, type DaemonClient } from '../../src/client/client.js';
import type { Event } from '../../src/daemon/protocol.js';
import { Store } from '../../src/store/store.js';
import { ensureBuilt } from '../support/build.js';
import { runCli } from '../support/cli.js';
import { canRun } from '../support/env.js';
import {
  bootGuest,
  connectConsole,
  expectCheckOk,
  expectGuestHealthy,
  type Guest,
  stopGuest,
} from '../support/guest.js';
import { isAlive, killPid, waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';
import { type Serve, serveRefuses, startServe } from './serve.js';

/** Opens a raw WebSocket with these headers; resolves the HTTP status of a refusal, or 101. */
function upgradeStatus(url: string, headers: Record<string, string>): Promise<number> {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { headers });
    ws.once('open', () => {
      ws.close();
      resolve(101);
    });
    ws.once('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0));
    ws.once('error', () => resolve(0));
  });
}

describe.skipIf(!canRun)('qsnap serve', () => {
  let sandbox: Sandbox;
  let a: Guest;
  let b: Guest;
  let serve: Serve;
  let client: DaemonClient;
  let env: NodeJS.ProcessEnv;
  let token: string;
  const vm: Record<string, string> = {};
  const pids: number[] = [];

  beforeAll(async () => {
    ensureBuilt();
    sandbox = await openSandbox('daemon');
    [a, b] = await Promise.all([bootGuest(sandbox), bootGuest(sandbox)]);
    env = { ...sandbox.env, QSNAP_STORE: join(sandbox.root, 'store') };
    serve = await startServe(['--max-streams', '1'], env);
    client = await connect(serve.url, { stateDir: sandbox.state });
    token = (await import('node:fs')).readFileSync(join(sandbox.state, 'daemon.token'), 'utf8').trim();
  }, 120_000);

  afterAll(async () => {
    await client?.close().catch(() => undefined);
    await serve?.stop();
    for (const pid of pids) await killPid(pid);
    await Promise.all([stopGuest(a), stopGuest(b)]);
    await sandbox?.dispose();
  });

  it('refuses a connection without the token, with a wrong one, or from another origin', async () => {
    expect(await upgradeStatus(serve.url, {})).toBe(401);
    expect(await upgradeStatus(serve.url, { Authorization: `Bearer ${'x'.repeat(43)}` })).toBe(401);
    const port = new URL(serve.url).port;
    expect(
      await upgradeStatus(serve.url, { Authorization: `Bearer ${token}`, Origin: 'http://evil.example' }),
    ).toBe(403);
    // Negative control: the right token is let in, from no origin and from the daemon's own page.
    expect(await upgradeStatus(serve.url, { Authorization: `Bearer ${token}` })).toBe(101);
    expect(
      await upgradeStatus(serve.url, {
        Authorization: `Bearer ${token}`,
        Origin: `http://127.0.0.1:${port}`,
      }),
    ).toBe(101);
    expect(statSync(join(sandbox.state, 'daemon.token')).mode & 0o777).toBe(0o600);
  });

  it('refuses to start when the token file is readable by others', async () => {
    const state = join(sandbox.root, 'state-open');
    mkdirSync(state, { mode: 0o700 });
    copyFileSync(join(sandbox.state, 'daemon.token'), join(state, 'daemon.token'));
    chmodSync(join(state, 'daemon.token'), 0o644);
    const r = await serveRefuses([], { ...env, QSNAP_STATE_DIR: state });
    expect(r.code, r.out).toBe(1);
    expect(r.out).toContain('[QSNAP_DAEMON_TOKEN]');
    chmodSync(join(state, 'daemon.token'), 0o600);
    // Negative control: the same file at 0600 is accepted (the daemon starts and is stopped).
    const ok = await startServe([], {
      ...env,
      QSNAP_STATE_DIR: state,
      QSNAP_STORE: join(sandbox.root, 's2'),
    });
    await ok.stop();
  }, 60_000);

  it('attaches VMs by QMP socket and tells their state; refuses what is not a socket', async () => {
    const ra = await client.attach({ qmp: a.vm.qmpPath, name: 'a' });
    const rb = await client.attach({ qmp: b.vm.qmpPath, name: 'b' });
    vm['a'] = ra.vm;
    vm['b'] = rb.vm;
    expect(ra.vm).toMatch(/^vm-/);
    expect(ra.vm).not.toBe(rb.vm);
    expect((await client.attach({ qmp: a.vm.qmpPath })).vm, 'attaching again gives the same id').toBe(ra.vm);
    expect(await client.status({ vm: ra.vm })).toMatchObject({ state: 'running', vm: ra.vm });
    await expect(client.attach({ qmp: join(sandbox.state, 'daemon.token') })).rejects.toMatchObject({
      code: 'QSNAP_DAEMON_PATH',
    });
    await expect(client.attach({ qmp: 'relative.sock' })).rejects.toMatchObject({
      code: 'QSNAP_DAEMON_PATH',
    });
    await expect(client.status({ vm: 'vm-nosuch' })).rejects.toMatchObject({ code: 'QSNAP_DAEMON_NO_VM' });
  });

  it('refuses names with ../ and malformed requests, and carries on', async () => {
    await expect(client.snapshot({ vm: vm['a']!, name: '../etc' })).rejects.toMatchObject({
      code: 'QSNAP_STORE_NAME',
    });
    await expect(client.inspect({ name: '../../catalog' })).rejects.toMatchObject({
      code: 'QSNAP_STORE_NAME',
    });
    await expect(client.request('nosuch' as 'vms', {})).rejects.toMatchObject({
      code: 'QSNAP_DAEMON_REQUEST',
    });
    await expect(client.request('status', { vm: 42 } as never)).rejects.toMatchObject({
      code: 'QSNAP_DAEMON_REQUEST',
    });
    expect((await client.vms()).vms).toHaveLength(2);
  });

  it('runs two VMs’ snapshots asked at once one after the other (--max-streams 1), events in order', async () => {
    const events: Event[] = [];
    const [ra, rb] = await Promise.all([
      client.snapshot({ vm: vm['a']!, name: 'a-clean' }, (e) => events.push(e)),
      client.snapshot({ vm: vm['b']!, name: 'b-clean' }, (e) => events.push(e)),
    ]);
    expect(ra).toMatchObject({ name: 'a-clean' });
    expect(rb).toMatchObject({ name: 'b-clean' });
    expect(typeof ra.downtimeMs).toBe('number');
    const ops = [...new Set(events.map((e) => e.op))];
    expect(ops).toHaveLength(2);
    // One after the other: the second stream starts after the first one's result.
    const started = ops.map((op) =>
      events.findIndex((e) => e.op === op && e.event === 'phase' && e.phase === 'started'),
    );
    const ended = ops.map((op) => events.findIndex((e) => e.op === op && e.event === 'result'));
    const [first, second] = started[0]! < started[1]! ? [0, 1] : [1, 0];
    expect(started[second]!, 'the second starts after the first ended').toBeGreaterThan(ended[first]!);
    for (const op of ops) {
      const progress = events.filter((e) => e.op === op && e.event === 'progress') as Extract<
        Event,
        { event: 'progress' }
      >[];
      expect(progress.length, 'progress events').toBeGreaterThan(0);
      expect(progress.map((p) => p.seq)).toEqual(progress.map((_, i) => i));
      for (let i = 1; i < progress.length; i++)
        expect(progress[i]!.doneBytes).toBeGreaterThanOrEqual(progress[i - 1]!.doneBytes);
    }
    const names = (await client.list()).snapshots.map((s) => s.name).sort();
    expect(names).toEqual(['a-clean', 'b-clean']);
    // The guests ran on (their snapshots' workload checks are the next test's).
    for (const g of [a, b])
      expect((await g.console.nextHeartbeat({ timeoutMs: 10_000 })).latchedFailures).toBe(0);
  }, 180_000);

  it('runs the CLI with --daemon: list and status print what a local run prints', async () => {
    const local = await runCli(['list'], env);
    const remote = await runCli(['list', '--daemon', serve.url], env);
    expect(remote.code, remote.stderr).toBe(0);
    expect(remote.stdout).toBe(local.stdout);
    expect(remote.stdout).toContain('a-clean');
    const status = await runCli(['status', '--qmp', a.vm.qmpPath], { ...env, QSNAP_DAEMON: serve.url });
    expect(status.code, status.stderr).toBe(0);
    expect(status.stdout).toMatch(/^state {5}running$/m);
  });

  it('restores both snapshots (the recorded command line, lazy) and their workloads pass the check', async () => {
    for (const name of ['a-clean', 'b-clean']) {
      const r = await client.restore({ name, lazy: true });
      pids.push(r['pid'] as number);
      expect(r.vm).toMatch(/^vm-/);
      expect(await client.status({ vm: r.vm })).toMatchObject({ state: 'running' });
      const relocated = r['relocated'] as Record<string, string>;
      const serial = Object.entries(relocated).find(([from]) => from.endsWith('serial.sock'))![1];
      const console = await connectConsole(serial);
      try {
        await expectCheckOk(console, `restored ${name}`);
      } finally {
        await console.close();
      }
      await client.detach({ vm: r.vm });
    }
  }, 180_000);

  it('keeps a snapshot going when its client disconnects; answers 5 clients × 20 requests and malformed frames meanwhile; QSNAP_BUSY with wait: false', async () => {
    const rssBefore = serve.rssKiB();
    const other = await connect(serve.url, { token });
    let opId: string | undefined;
    const asked = other.snapshot({ vm: vm['a']!, name: 'a-left' }, (e) => {
      if (e.event === 'progress' && !opId) {
        opId = e.op;
        void other.close();
      }
    });
    await expect(asked).rejects.toMatchObject({ code: 'QSNAP_DAEMON_DISCONNECTED' });
    expect(opId).toBeDefined();
    await expect(client.snapshot({ vm: vm['a']!, name: 'a-busy', wait: false })).rejects.toMatchObject({
      code: 'QSNAP_BUSY',
    });
    // 5 clients × 20 requests (status of both VMs, list, inspect) while it streams.
    const clients = await Promise.all(Array.from({ length: 5 }, () => connect(serve.url, { token })));
    const latencies: number[] = [];
    const answers = await Promise.all(
      clients.map(async (c, i) => {
        const got: string[] = [];
        for (let n = 0; n < 20; n++) {
          const t = performance.now();
          const kind = n % 4;
          if (kind === 0 || kind === 1) await c.status({ vm: vm[kind === 0 ? 'a' : 'b']! });
          else if (kind === 2) await c.list();
          else await c.inspect({ name: 'a-clean' });
          latencies.push(performance.now() - t);
          got.push(`${i}-${n}`);
        }
        return got;
      }),
    );
    expect(answers.flat()).toHaveLength(100);
    expect(new Set(answers.flat()).size).toBe(100);
    await Promise.all(clients.map((c) => c.close()));
    // Malformed frames on a raw socket: not JSON, wrong types, unknown ops, binary — each answered.
    const raw = new WebSocket(serve.url, { headers: { Authorization: `Bearer ${token}` } });
    await new Promise((r) => raw.once('open', r));
    let errors = 0;
    raw.on('message', (d) => {
      if (JSON.parse(d.toString()).ok === false) errors++;
    });
    const bad = [
      '{',
      'null',
      '[]',
      '{"id":"1"}',
      '{"id":"1","op":"nosuch","args":{}}',
      '{"id":"1","op":"status","args":{"vm":1}}',
    ];
    for (let i = 0; i < 200; i++)
      raw.send(i % 7 === 6 ? Buffer.from([1, 2, 3]) : bad[i % 6]!, { binary: i % 7 === 6 });
    await waitUntil(() => errors >= 200, 10_000, 'an error frame for each malformed frame');
    // An oversized frame closes that connection (1009), not the daemon.
    const closed = new Promise<number>((r) => raw.once('close', (code) => r(code)));
    raw.send('x'.repeat(128 * 1024));
    expect(await closed).toBe(1009);
    await waitUntil(
      async () => (await client.result({ op: opId! }))['state'] !== 'running',
      120_000,
      'the snapshot',
    );
    expect(await client.result({ op: opId! })).toMatchObject({ state: 'done', result: { name: 'a-left' } });
    expect((await client.list()).snapshots.map((s) => s.name)).toContain('a-left');
    latencies.sort((x, y) => x - y);
    console.log(
      `daemon load: 100 requests while a snapshot streamed, p50 ${latencies[50]!.toFixed(1)} ms, p99 ${latencies[98]!.toFixed(1)} ms; RSS ${rssBefore} → ${serve.rssKiB()} KiB after 200 malformed frames`,
    );
    expect(serve.rssKiB(), 'memory stays flat').toBeLessThan(rssBefore + 64 * 1024);
  }, 180_000);

  it('recovers after a SIGKILL mid-snapshot: re-attaches the VMs, the guest runs, the next snapshot works', async () => {
    let killed = false;
    const asked = client
      .snapshot({ vm: vm['b']!, name: 'b-killed' }, (e) => {
        if (e.event === 'progress' && !killed) {
          killed = true;
          process.kill(serve.pid, 'SIGKILL');
        }
      })
      .catch((err) => err);
    expect(await asked).toMatchObject({ code: 'QSNAP_DAEMON_DISCONNECTED' });
    await waitUntil(() => !isAlive(serve.pid), 5000, 'the daemon to die');
    serve = await startServe(['--max-streams', '1'], env);
    expect(serve.log()).toContain(`re-attached VM ${vm['b']}`);
    expect(serve.log()).toContain(`re-attached VM ${vm['a']}`);
    client = await connect(serve.url, { token });
    expect(await client.status({ vm: vm['b']! })).toMatchObject({ state: 'running' });
    await expectGuestHealthy(b);
    // What the killed daemon left is gone: no intent record, no operation in the catalog, no stream directory.
    const intents = join(sandbox.state, 'intents');
    expect(existsSync(intents) ? readdirSync(intents) : [], 'intent records').toEqual([]);
    const catalog = await (await Store.open({ dir: env['QSNAP_STORE']!, stateDir: sandbox.state })).read();
    expect(catalog.operations, 'operations in the catalog').toEqual([]);
    expect(
      readdirSync(sandbox.tmp).filter((f) => f.startsWith('qsnap-stream-')),
      'stream directories',
    ).toEqual([]);
    expect(await client.snapshot({ vm: vm['b']!, name: 'b-next' })).toMatchObject({ name: 'b-next' });
    expect((await client.list()).snapshots.map((s) => s.name)).not.toContain('b-killed');
  }, 180_000);
  it('fails the operations queued on a VM whose QEMU was killed, with a clear code; the queue goes on', async () => {
    const id = vm['a']!;
    const t0 = performance.now();
    const first = client.snapshot({ vm: id, name: 'a-1', overwrite: true }).catch((err) => err);
    const queued = [
      client.snapshot({ vm: id, name: 'a-2' }).catch((err) => err),
      client.snapshot({ vm: id, name: 'a-3' }).catch((err) => err),
    ];
    await waitUntil(
      async () => ((await client.status({ vm: id }))['operations'] as unknown[]).length === 3,
      10_000,
      'three operations on the VM',
    );
    // The queue is visible: the running one, then the two waiting with their place and time.
    const ops = (await client.status({ vm: id }))['operations'] as {
      state: string;
      position?: number;
      waitingMs: number;
    }[];
    expect(ops.map((o) => o.state)).toEqual(['running', 'queued', 'queued']);
    expect(ops.slice(1).map((o) => o.position)).toEqual([1, 2]);
    expect(ops[1]!.waitingMs).toBeGreaterThanOrEqual(0);
    a.vm.kill();
    const failed = await first;
    console.log(
      `the running snapshot failed with ${failed.code} after ${(performance.now() - t0).toFixed(0)} ms`,
    );
    expect(failed.code).toMatch(/^QSNAP_(SNAPSHOT_QEMU_GONE|DAEMON_VM_GONE)$/);
    for (const q of queued) expect(await q).toMatchObject({ code: 'QSNAP_DAEMON_VM_GONE' });
    expect(await client.status({ vm: id })).toMatchObject({ state: 'gone' });
    // The daemon goes on: the other VM snapshots.
    expect(await client.snapshot({ vm: vm['b']!, name: 'b-after' })).toMatchObject({ name: 'b-after' });
    await client.detach({ vm: id });
  }, 180_000);
});
