/**
 * The client and every command schema against a real qemu-system-x86_64 (7.2 here), TCG, no
 * guest. A schema that rejects a real reply fails here as QSNAP_QMP_PROTOCOL.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { commands, QmpClient, type QmpEvent } from '../../src/qmp/index.js';
import { hasQemu, hasQemuImg } from '../support/env.js';
import { makeTempDir, type QemuInstance, qemuImgCreate, startQemu } from './qemu-harness.js';

const OPTIONS = { connectTimeoutMs: 10_000, commandTimeoutMs: 20_000 };

async function commandError(p: Promise<unknown>): Promise<Record<string, unknown>> {
  try {
    await p;
  } catch (err) {
    return err as Record<string, unknown>;
  }
  throw new Error('expected the command to fail');
}

describe.skipIf(!hasQemu || !hasQemuImg)('QEMU without disks', () => {
  let tmp: Awaited<ReturnType<typeof makeTempDir>> | undefined;
  let vm: QemuInstance | undefined;
  let client: QmpClient;
  const seen: QmpEvent[] = [];

  beforeAll(async () => {
    tmp = await makeTempDir();
    vm = await startQemu(tmp.dir, ['-name', 'qsnap-qmp-test']);
    client = await QmpClient.connect(vm.qmpPath, OPTIONS);
    client.on('*', (e) => seen.push(e));
  });

  afterAll(async () => {
    await client?.close();
    await vm?.stop();
    await tmp?.remove();
  });

  it('greets with its version and capabilities', async () => {
    const version = await client.execute('query-version');
    expect(client.greeting.version).toEqual({
      major: version.qemu.major,
      minor: version.qemu.minor,
      micro: version.qemu.micro,
    });
    expect(client.greeting.package).toBe(version.package);
    expect(client.greeting.capabilities).toContain('oob');
  });

  it('knows every command in the table', async () => {
    const available = new Set((await client.execute('query-commands')).map((c) => c.name));
    const missing = Object.keys(commands).filter((name) => !available.has(name));
    expect(missing).toEqual([]);
    expect(available.has('no-such-command')).toBe(false); // negative control
  });

  it('answers the queries with replies that pass their schemas', async () => {
    expect(await client.execute('query-status')).toMatchObject({ status: 'prelaunch', running: false });
    expect(await client.execute('query-name')).toEqual({ name: 'qsnap-qmp-test' });
    const kvm = await client.execute('query-kvm');
    expect(kvm.enabled).toBe(false); // -accel tcg
    expect(await client.execute('query-memory-size-summary')).toMatchObject({
      'base-memory': 64 * 1024 * 1024,
    });
    const [memdev] = await client.execute('query-memdev');
    expect(memdev).toMatchObject({ id: 'pc.ram', size: 64 * 1024 * 1024, share: false });
    expect(await client.execute('query-block')).toEqual([]);
    expect(await client.execute('query-named-block-nodes', { flat: true })).toEqual([]);
    expect(await client.execute('query-jobs')).toEqual([]);
    expect(await client.execute('query-block-jobs')).toEqual([]);
    expect(await client.execute('query-migrate')).toEqual({});
    const cpus = await client.execute('query-cpus-fast');
    expect(cpus).toHaveLength(1);
    expect(cpus[0]).toMatchObject({ 'cpu-index': 0, target: 'x86_64' });
    const [machine] = await client.execute('query-command-line-options', { option: 'machine' });
    expect(machine?.option).toBe('machine');
    expect(machine?.parameters.length).toBeGreaterThan(0);
    expect(await client.execute('human-monitor-command', { 'command-line': 'info status' })).toMatch(
      /^VM status: paused \(prelaunch\)/,
    );
    const schema = await client.execute('query-qmp-schema');
    expect(schema.some((entity) => entity.name === 'query-status' && entity['meta-type'] === 'command')).toBe(
      true,
    );
  });

  it('reads QOM properties', async () => {
    expect(await client.execute('qom-get', { path: '/machine', property: 'type' })).toMatch(/^pc-i440fx-/);
    const props = await client.execute('qom-list', { path: '/machine' });
    expect(props.find((p) => p.name === 'type')).toMatchObject({ type: 'string' });
    expect(await commandError(client.execute('qom-get', { path: '/nope', property: 'type' }))).toMatchObject({
      code: 'QSNAP_QMP_COMMAND',
      command: 'qom-get',
      errorClass: 'DeviceNotFound',
    });
  });

  it('sets and reads migration capabilities and parameters', async () => {
    const before = await client.execute('query-migrate-capabilities');
    expect(before.find((c) => c.capability === 'background-snapshot')).toEqual({
      capability: 'background-snapshot',
      state: false,
    });
    await client.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'background-snapshot', state: true },
        { capability: 'events', state: true },
      ],
    });
    const after = await client.execute('query-migrate-capabilities');
    expect(after.find((c) => c.capability === 'background-snapshot')?.state).toBe(true);

    expect((await client.execute('query-migrate-parameters'))['max-bandwidth']).toBe(128 * 1024 * 1024);
    await client.execute('migrate-set-parameters', { 'max-bandwidth': 4 * 1024 ** 3 });
    expect((await client.execute('query-migrate-parameters'))['max-bandwidth']).toBe(4 * 1024 ** 3);
  });

  it('reports QEMU errors for commands that cannot run here', async () => {
    expect(await commandError(client.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' }))).toMatchObject({
      code: 'QSNAP_QMP_COMMAND',
      errorClass: 'GenericError',
    });
    for (const name of ['job-complete', 'job-dismiss', 'job-cancel'] as const) {
      expect(await commandError(client.execute(name, { id: 'nope' }))).toMatchObject({
        code: 'QSNAP_QMP_COMMAND',
        command: name,
      });
    }
    expect(await commandError(client.executeRaw('no-such-command'))).toMatchObject({
      code: 'QSNAP_QMP_COMMAND',
      errorClass: 'CommandNotFound',
    });
    expect(await client.execute('migrate_cancel')).toBeUndefined();
  });

  it('runs cont and stop with RESUME and STOP events carrying timestamps', async () => {
    const resumed = client.waitFor('RESUME', undefined, { timeoutMs: 10_000 });
    const beforeUs = Date.now() * 1000;
    await client.execute('cont');
    const resume = await resumed;
    expect((await client.execute('query-status')).running).toBe(true);

    const stopped = client.waitFor('STOP', undefined, { timeoutMs: 10_000 });
    await client.execute('stop');
    const stop = await stopped;
    const afterUs = Date.now() * 1000;
    expect(await client.execute('query-status')).toMatchObject({ status: 'paused', running: false });

    // QEMU's timestamps are wall-clock microseconds, as ours.
    expect(resume.timestampUs).toBe(resume.timestamp.seconds * 1e6 + resume.timestamp.microseconds);
    expect(resume.timestampUs).toBeGreaterThanOrEqual(beforeUs - 1_000_000);
    expect(stop.timestampUs).toBeGreaterThan(resume.timestampUs);
    expect(stop.timestampUs).toBeLessThanOrEqual(afterUs + 1_000_000);
    expect(stop.data).toEqual({});
  });

  it('resets with a typed RESET event', async () => {
    const reset = client.waitFor('RESET', undefined, { timeoutMs: 10_000 });
    await client.execute('system_reset');
    expect((await reset).data).toEqual({ guest: false, reason: 'host-qmp-system-reset' });
  });

  it('adds, snapshots (in a transaction) and deletes a qcow2 node', async () => {
    const dir = tmp!.dir;
    const image = join(dir, 'disk.qcow2');
    const overlay = join(dir, 'disk-overlay.qcow2');
    await qemuImgCreate(image, '16M');
    await client.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'n0',
      file: { driver: 'file', filename: image },
    });
    const nodes = await client.execute('query-named-block-nodes', { flat: true });
    const n0 = nodes.find((n) => n['node-name'] === 'n0');
    expect(n0).toMatchObject({ drv: 'qcow2', file: image, ro: false, image: { format: 'qcow2' } });
    expect(n0?.image['virtual-size']).toBe(16 * 1024 * 1024);

    await client.execute('transaction', {
      actions: [
        {
          type: 'blockdev-snapshot-sync',
          data: {
            'node-name': 'n0',
            'snapshot-file': overlay,
            'snapshot-node-name': 'n0-overlay',
            format: 'qcow2',
          },
        },
      ],
    });
    expect(existsSync(overlay)).toBe(true);
    // A transaction is all-or-nothing: a failing action is a QEMU error, and nothing is created.
    expect(
      await commandError(
        client.execute('transaction', {
          actions: [
            {
              type: 'blockdev-snapshot-sync',
              data: { 'node-name': 'absent', 'snapshot-file': join(dir, 'x.qcow2') },
            },
          ],
        }),
      ),
    ).toMatchObject({ code: 'QSNAP_QMP_COMMAND', command: 'transaction' });
    expect(existsSync(join(dir, 'x.qcow2'))).toBe(false);

    await client.execute('blockdev-del', { 'node-name': 'n0' });
    const remaining = await client.execute('query-named-block-nodes', { flat: true });
    expect(remaining.some((n) => n['node-name'] === 'n0')).toBe(false);
    expect(await commandError(client.execute('blockdev-del', { 'node-name': 'n0' }))).toMatchObject({
      code: 'QSNAP_QMP_COMMAND',
      errorClass: 'GenericError',
    });
  });

  it('takes a background snapshot with migrate and reports it in query-migrate', async () => {
    const file = join(tmp!.dir, 'snapshot.bin');
    await client.execute('cont');
    const completed = client.waitFor(
      'MIGRATION',
      (e) => e.data.status === 'completed' || e.data.status === 'failed',
      {
        timeoutMs: 60_000,
      },
    );
    await client.execute('migrate', { uri: `exec:cat > ${file}` });
    expect((await completed).data.status).toBe('completed');
    const info = await client.execute('query-migrate');
    expect(info.status).toBe('completed');
    expect(info.ram?.total).toBeGreaterThan(64 * 1024 * 1024);
    expect(info.ram?.remaining).toBe(0);
    expect(typeof info.ram?.mbps).toBe('number');
    // The background snapshot paused and resumed the VM around the device-state capture.
    const names = seen.map((e) => e.event);
    expect(names).toContain('MIGRATION');
    expect(names.lastIndexOf('RESUME')).toBeGreaterThan(names.lastIndexOf('STOP'));
  });

  it('runs many commands in flight at once', async () => {
    const replies = await Promise.all(
      Array.from({ length: 25 }, (_, i) =>
        i % 2 ? client.execute('query-status') : client.execute('query-name'),
      ),
    );
    expect(replies.filter((r) => 'running' in r)).toHaveLength(12);
    expect(replies.filter((r) => 'name' in r)).toHaveLength(13);
  });

  it('quits: SHUTDOWN, then the session ends as peer-closed and QEMU exits', async () => {
    const shutdown = client.waitFor('SHUTDOWN', undefined, { timeoutMs: 10_000 });
    const ended = new Promise<unknown>((resolve) => client.onDisconnect(resolve));
    await client.execute('quit');
    expect((await shutdown).data).toEqual({ guest: false, reason: 'host-qmp-quit' });
    expect(await ended).toMatchObject({ code: 'QSNAP_QMP_DISCONNECTED', reason: 'peer-closed' });
    expect(await vm!.exited).toBe(0);
    expect(await commandError(client.execute('query-status'))).toMatchObject({
      code: 'QSNAP_QMP_DISCONNECTED',
    });
  });
});

describe.skipIf(!hasQemu || !hasQemuImg)('QEMU with a virtio qcow2 drive', () => {
  let tmp: Awaited<ReturnType<typeof makeTempDir>> | undefined;
  let vm: QemuInstance | undefined;
  let client: QmpClient;

  beforeAll(async () => {
    tmp = await makeTempDir();
    await qemuImgCreate(join(tmp.dir, 'base.qcow2'), '32M');
    await qemuImgCreate(join(tmp.dir, 'top.qcow2'), '32M', join(tmp.dir, 'base.qcow2'));
    vm = await startQemu(tmp.dir, ['-drive', `file=${join(tmp.dir, 'top.qcow2')},if=virtio`]);
    client = await QmpClient.connect(vm.qmpPath, OPTIONS);
  });

  afterAll(async () => {
    await client?.close();
    await vm?.stop();
    await tmp?.remove();
  });

  it('describes the drive and its backing chain (query-block)', async () => {
    const [drive, ...others] = await client.execute('query-block');
    expect(others).toEqual([]);
    expect(drive).toMatchObject({ device: 'virtio0', removable: false, locked: false });
    expect(drive?.qdev).toMatch(/virtio-backend$/);
    const inserted = drive?.inserted;
    expect(inserted).toMatchObject({ drv: 'qcow2', ro: false, backing_file_depth: 1 });
    expect(inserted?.['node-name']).toMatch(/^#block\d+$/); // auto-named by QEMU
    expect(inserted?.backing_file).toBe(join(tmp!.dir, 'base.qcow2'));
    expect(inserted?.image['backing-filename']).toBe(join(tmp!.dir, 'base.qcow2'));
    expect(inserted?.image['backing-image']?.filename).toBe(join(tmp!.dir, 'base.qcow2'));
    expect(inserted?.image['format-specific']?.type).toBe('qcow2');
  });

  it('lists every node flat (query-named-block-nodes)', async () => {
    const nodes = await client.execute('query-named-block-nodes', { flat: true });
    // top (qcow2) + its file + base (qcow2) + its file
    expect(nodes.map((n) => n.drv).sort()).toEqual(['file', 'file', 'qcow2', 'qcow2']);
    const nested = await client.execute('query-named-block-nodes');
    expect(nested.length).toBeGreaterThanOrEqual(nodes.length);
  });

  it('snapshots the drive, then commits the overlay back with a job', async () => {
    const dir = tmp!.dir;
    const [drive] = await client.execute('query-block');
    const activeNode = drive!.inserted!['node-name']!;

    // blockdev-snapshot: an overlay added by hand becomes the active layer.
    await qemuImgCreate(join(dir, 'ov1.qcow2'), '32M');
    await client.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'ov1',
      file: { driver: 'file', filename: join(dir, 'ov1.qcow2') },
      backing: null,
    });
    await client.execute('blockdev-snapshot', { node: activeNode, overlay: 'ov1' });
    // blockdev-snapshot-sync: QEMU creates the overlay file itself.
    await client.execute('blockdev-snapshot-sync', {
      device: 'virtio0',
      'snapshot-file': join(dir, 'ov2.qcow2'),
      'snapshot-node-name': 'ov2',
      format: 'qcow2',
    });
    const [after] = await client.execute('query-block');
    expect(after?.inserted?.['node-name']).toBe('ov2');
    expect(after?.inserted?.backing_file_depth).toBe(3);

    const ready = client.waitFor(
      'JOB_STATUS_CHANGE',
      (e) => e.data.id === 'commit1' && e.data.status === 'ready',
      {
        timeoutMs: 30_000,
      },
    );
    const blockReady = client.waitFor('BLOCK_JOB_READY', (e) => e.data.device === 'commit1', {
      timeoutMs: 30_000,
    });
    // Active commit of ov2 into ov1 only (the default base would be the bottom of the chain).
    await client.execute('block-commit', {
      device: 'ov2',
      'job-id': 'commit1',
      'base-node': 'ov1',
      'auto-dismiss': false,
    });
    await ready;
    expect((await blockReady).data).toMatchObject({ type: 'commit', device: 'commit1' });
    expect(await client.execute('query-jobs')).toEqual([
      expect.objectContaining({ id: 'commit1', type: 'commit', status: 'ready' }),
    ]);
    expect((await client.execute('query-block-jobs'))[0]).toMatchObject({ device: 'commit1', ready: true });

    const concluded = client.waitFor(
      'JOB_STATUS_CHANGE',
      (e) => e.data.id === 'commit1' && e.data.status === 'concluded',
      {
        timeoutMs: 30_000,
      },
    );
    const completed = client.waitFor('BLOCK_JOB_COMPLETED', (e) => e.data.device === 'commit1', {
      timeoutMs: 30_000,
    });
    await client.execute('job-complete', { id: 'commit1' });
    await concluded;
    expect((await completed).data.error).toBeUndefined();
    const gone = client.waitFor(
      'JOB_STATUS_CHANGE',
      (e) => e.data.id === 'commit1' && e.data.status === 'null',
      {
        timeoutMs: 30_000,
      },
    );
    await client.execute('job-dismiss', { id: 'commit1' });
    await gone;
    expect(await client.execute('query-jobs')).toEqual([]);
    const [committed] = await client.execute('query-block');
    expect(committed?.inserted).toMatchObject({ 'node-name': 'ov1', backing_file_depth: 2 });
  });

  it('cancels a running job with job-cancel', async () => {
    const dir = tmp!.dir;
    await client.execute('blockdev-snapshot-sync', {
      device: 'virtio0',
      'snapshot-file': join(dir, 'ov3.qcow2'),
      'snapshot-node-name': 'ov3',
      format: 'qcow2',
    });
    const ready = client.waitFor(
      'JOB_STATUS_CHANGE',
      (e) => e.data.id === 'commit2' && e.data.status === 'ready',
      {
        timeoutMs: 30_000,
      },
    );
    await client.execute('block-commit', { device: 'ov3', 'job-id': 'commit2' });
    await ready;
    const cancelled = client.waitFor('BLOCK_JOB_CANCELLED', (e) => e.data.device === 'commit2', {
      timeoutMs: 30_000,
    });
    await client.execute('job-cancel', { id: 'commit2' });
    expect((await cancelled).data).toMatchObject({ type: 'commit' });
  });
});
