/**
 * What every fault-matrix file needs: a sandbox, the busy test guest behind a QMP proxy (for
 * the `qmp-closed` fault), a store on a tmpfs of its own (for `fs-full`), the commands a user
 * runs next (`status` recovers the VM, `gc` the store), and the checks after every cell.
 */
import { existsSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { expect } from 'vitest';
import { recoverStore } from '../../src/store/recover.js';
import { Store } from '../../src/store/store.js';
import { runCli } from '../support/cli.js';
import { bootGuest, drainGuards, expectGuestHealthy, type Guest, stopGuest } from '../support/guest.js';
import { waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';
import { QmpProxy } from './inject.js';

export class FaultWorld {
  guest!: Guest;
  proxy: QmpProxy | undefined;
  store!: Store;
  storeDir!: string;
  private seq = 0;

  private constructor(readonly sandbox: Sandbox) {}

  static async open(name: string): Promise<FaultWorld> {
    const world = new FaultWorld(await openSandbox(name));
    world.storeDir = join(await world.sandbox.mountTmpfs('size=900m'), 'store');
    world.store = await Store.open({ dir: world.storeDir, stateDir: world.sandbox.state });
    await world.boot();
    return world;
  }

  async close(): Promise<void> {
    await this.proxy?.stop();
    await stopGuest(this.guest);
    await this.sandbox.dispose();
  }

  /** A (new) guest, and a QMP proxy in front of it. */
  async boot(): Promise<void> {
    if (this.guest) await stopGuest(this.guest);
    // Smaller than the default guest (256 MiB, a 64 MiB ring): every phase is there, and the
    // whole matrix (some 200 cells, each a snapshot, a check and a delete) fits in CI.
    this.guest = await bootGuest(this.sandbox, { memoryMiB: 160, workloadMiB: 48, slots: 4096 });
    await this.proxy?.stop();
    this.proxy = new QmpProxy(join(this.sandbox.root, `proxy${this.seq++}.sock`), this.guest.vm.qmpPath);
    await this.proxy.start();
  }

  name(): string {
    return `c${this.seq++}`;
  }

  env(): NodeJS.ProcessEnv {
    return { ...this.sandbox.env, QSNAP_STORE: this.storeDir };
  }

  /**
   * What comes next: this process's next store call (clears what a failed in-process operation
   * could not record), `qsnap status` on the socket the operation used (recovers the VM),
   * `qsnap gc`. Returns what they said they recovered.
   */
  async nextCommands(qmp: string | undefined): Promise<string> {
    const said: string[] = [];
    const recovered = await recoverStore(this.store);
    if (recovered.some((a) => a.startsWith('adopted snapshot'))) said.push('the store adopted the snapshot');
    else if (recovered.some((a) => a.startsWith('adopted'))) said.push('the store adopted the restored VM');
    else if (recovered.length) said.push('the store recovered');
    if (qmp && this.guest.vm.running) {
      const status = await runCli(['status', '--qmp', qmp], this.env());
      expect(status.code, status.stderr).toBe(0);
      if (/^recovered/m.test(status.stdout)) said.push('status recovered the VM');
    }
    const gc = await runCli(['gc'], this.env());
    expect(gc.code, gc.stderr).toBe(0);
    if (/^recovered: adopted snapshot/m.test(gc.stdout)) said.push('the store adopted the snapshot');
    else if (/^recovered: adopted/m.test(gc.stdout)) said.push('the store adopted the restored VM');
    else if (/^recovered: /m.test(gc.stdout)) said.push('the store recovered');
    return [...new Set(said)].join(', ');
  }

  /** No drain guard, stream directory or intent record left; the catalog matches the files. */
  async expectTidy(): Promise<void> {
    const { sandbox } = this;
    // A drain guard lives until QEMU closes the stream, right after the migration ends.
    await waitUntil(() => drainGuards(sandbox).length === 0, 10_000, 'drain guards').catch(() => undefined);
    expect(drainGuards(sandbox), 'drain guards').toEqual([]);
    expect(
      readdirSync(sandbox.tmp).filter((f) => f.startsWith('qsnap-stream-')),
      'stream dirs',
    ).toEqual([]);
    const intents = join(sandbox.state, 'intents');
    expect(existsSync(intents) ? readdirSync(intents) : [], 'intent records').toEqual([]);
    const c = await this.store.read();
    expect(c.operations, 'operations in flight').toEqual([]);
    for (const l of Object.values(c.layers)) expect(existsSync(l.path), l.path).toBe(true);
    const files = readdirSync(this.store.snapshotsDir).filter((f) => f.endsWith('.qsnap'));
    const known = new Set([
      ...Object.values(c.snapshots).map((s) => s.file),
      ...c.garbage.map((g) => g.path.split('/').pop()),
    ]);
    expect(
      files.filter((f) => !known.has(f)),
      'snapshot files without a catalog entry',
    ).toEqual([]);
  }

  /**
   * After a cell (its checks done, passed or not): what a failed cell left goes, so that the
   * next cell starts clean and fails only for what it does itself.
   */
  async scrub(): Promise<void> {
    const { tmp, state } = this.sandbox;
    for (const f of readdirSync(tmp))
      if (f.startsWith('qsnap-stream-') || f.startsWith('qsnap-vm-'))
        rmSync(join(tmp, f), { recursive: true, force: true });
    rmSync(join(state, 'intents'), { recursive: true, force: true });
    // A guest a failed cell left hung (its monitor silent) is replaced.
    const answers = await this.guest.vm.qmp
      .execute('query-status', undefined, { timeoutMs: 3000 })
      .then((s) => s.running)
      .catch(() => false);
    if (!answers) await this.boot();
  }

  /** The guest runs and passes its check, or — QEMU killed — a new one is booted. */
  async guestAfter(stopsBefore: number): Promise<string> {
    if (!this.guest.vm.running) {
      await this.boot();
      return 'QEMU gone; nothing left of it';
    }
    await expectGuestHealthy(this.guest);
    return this.guest.stops > stopsBefore ? 'running, check ok' : 'running (never paused), check ok';
  }
}
