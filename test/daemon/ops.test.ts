/**
 * The daemon's other operations with a real guest, in `make test-daemon` (QSNAP_DAEMON_LONG=1;
 * `make test` has the core proof in daemon.test.ts): launch from a command line, inspect,
 * verify, cancel (a queued snapshot, and a running one past its pause, which is refused),
 * delete, gc, revert in place; and the CLI's commands through the daemon with --daemon.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connect, type DaemonClient } from '../../src/client/client.js';
import { GuestConsole } from '../../src/guest/console.js';
import { ensureBuilt } from '../support/build.js';
import { runCli } from '../support/cli.js';
import { canRun } from '../support/env.js';
import { expectCheckOk, testGuestCommandLine } from '../support/guest.js';
import { killPid, waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';
import { type Serve, startServe } from './serve.js';

describe.skipIf(!canRun || process.env['QSNAP_DAEMON_LONG'] !== '1')('the daemon’s operations', () => {
  let sandbox: Sandbox;
  let serve: Serve;
  let client: DaemonClient;
  let env: NodeJS.ProcessEnv;
  let vm: string;
  let qmp: string;
  let serialSocket: string;
  const pids = new Set<number>();

  beforeAll(async () => {
    ensureBuilt();
    sandbox = await openSandbox('dops');
    env = { ...sandbox.env, QSNAP_STORE: join(sandbox.root, 'store') };
    serve = await startServe([], env);
    client = await connect(serve.url, { stateDir: sandbox.state });
  }, 60_000);

  afterAll(async () => {
    await client?.close().catch(() => undefined);
    await serve?.stop();
    for (const pid of pids) await killPid(pid);
    await sandbox?.dispose();
  });

  async function expectWorkloadOk(what: string) {
    const console = await GuestConsole.connect(serialSocket);
    try {
      await console.waitReady({ timeoutMs: 120_000 }).catch(() => undefined);
      await expectCheckOk(console, what);
    } finally {
      await console.close();
    }
  }

  it('launches a VM from its command line and attaches it; refuses a binary that is not QEMU', async () => {
    const dir = join(sandbox.root, 'guest');
    mkdirSync(dir);
    const disk = join(dir, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(80 * 2 ** 20)]);
    const line = testGuestCommandLine(dir, disk);
    serialSocket = line.serialSocket;
    await expect(client.launch({ argv: ['/bin/sh', '-c', 'true'] })).rejects.toMatchObject({
      code: 'QSNAP_DAEMON_PATH',
    });
    const r = await client.launch({ argv: line.argv, name: 'launched' });
    pids.add(r['pid'] as number);
    vm = r.vm;
    qmp = String(r['qmp']);
    expect(await client.status({ vm })).toMatchObject({ state: 'running' });
    const console = await GuestConsole.connect(serialSocket);
    await console.waitReady({ timeoutMs: 120_000 });
    await console.close();
  }, 180_000);

  it('snapshots, inspects and verifies by name', async () => {
    expect(await client.snapshot({ vm, name: 'base' })).toMatchObject({ name: 'base' });
    const inspected = await client.inspect({ name: 'base' });
    expect(inspected['manifest']).toMatchObject({ vm: expect.any(Object) });
    const verified = await client.verify({ name: 'base' });
    expect(verified['bytesVerified']).toBeGreaterThan(0);
    await expect(client.verify({ name: 'nosuch' })).rejects.toMatchObject({ code: 'QSNAP_STORE_NOT_FOUND' });
  }, 120_000);

  it('cancels a queued snapshot at once; refuses to cancel one QEMU has begun', async () => {
    let running: string | undefined;
    const first = client.snapshot({ vm, name: 'x1' }, (e) => {
      if (e.event === 'progress') running ??= e.op;
    });
    let queuedOp: string | undefined;
    const second = client
      .snapshot({ vm, name: 'x2' }, (e) => {
        if (e.event === 'phase' && e.phase === 'queued') queuedOp ??= e.op;
      })
      .catch((err) => err);
    await waitUntil(
      () => running !== undefined && queuedOp !== undefined,
      60_000,
      'a running and a queued snapshot',
    );
    expect(await client.cancel({ op: queuedOp! })).toMatchObject({ state: 'failed' });
    expect(await second).toMatchObject({ code: 'QSNAP_DAEMON_CANCELLED' });
    await expect(client.cancel({ op: running! })).rejects.toMatchObject({
      code: 'QSNAP_DAEMON_NOT_CANCELLABLE',
    });
    expect(await first).toMatchObject({ name: 'x1' });
    expect((await client.list()).snapshots.map((s) => s.name).sort()).toEqual(['base', 'x1']);
  }, 120_000);

  it('runs the CLI’s commands in the daemon with --daemon, with the output of a local run', async () => {
    const daemonFlag = ['--daemon', serve.url];
    const local = await runCli(['list'], env);
    const remote = await runCli(['list', ...daemonFlag], env);
    expect(remote.code, remote.stderr).toBe(0);
    expect(remote.stdout).toBe(local.stdout);
    const status = await runCli(['status', '--qmp', qmp, ...daemonFlag], env);
    expect(status.code, status.stderr).toBe(0);
    expect(status.stdout).toMatch(/^state {5}running$/m);
    const snap = await runCli(['snapshot', '--qmp', qmp, '--name', 'cli', '--json'], {
      ...env,
      QSNAP_DAEMON: serve.url,
    });
    expect(snap.code, snap.stderr).toBe(0);
    expect(snap.json).toMatchObject({ ok: true, name: 'cli' });
    const refused = await runCli(['snapshot', '--qmp', qmp, '--out', '/tmp/x.qsnap', ...daemonFlag], env);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain('[QSNAP_USAGE]');
    const del = await runCli(['delete', 'x1', ...daemonFlag], env);
    expect(del.code, del.stderr).toBe(0);
    expect(del.stdout).toContain('delete  snapshot x1');
    const gc = await runCli(['gc', '--dry-run', ...daemonFlag], env);
    expect(gc.code, gc.stderr).toBe(0);
    expect((await client.list()).snapshots.map((s) => s.name).sort()).toEqual(['base', 'cli']);
  }, 180_000);

  it('reverts the VM to a snapshot in place: same id and sockets, a new QEMU, the workload’s check passes', async () => {
    const before = await client.status({ vm });
    const r = await client.revert({ vm, name: 'base', lazy: true });
    expect(r.vm).toBe(vm);
    const after = await client.status({ vm });
    pids.add(after['pid'] as number);
    expect(after['pid']).not.toBe(before['pid']);
    expect(after).toMatchObject({ state: 'running', qmp });
    await expectWorkloadOk('reverted to base');
  }, 180_000);
});
