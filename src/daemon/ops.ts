import { spawn } from 'node:child_process';
import { basename } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { openSnapshot } from '../format/index.js';
import { QmpClient } from '../qmp/index.js';
import { collect } from '../store/collect.js';
import { checkName } from '../store/names.js';
import { findSnapshot } from '../store/restore.js';
import { parseCommandLine } from '../vm/cmdline.js';
import { isRunning } from '../vm/process.js';
import { sweepStaleRunDirs } from '../vm/run-dir.js';
import type { Controller, OpRecord } from './controller.js';
import { DaemonError } from './errors.js';
import type { ArgsOf, OpName } from './protocol.js';
import type { AttachedVm } from './vms.js';

/** What a handler is told by the server: `begin` is called when a long operation gets its id. */
export interface OpContext {
  begin(op: OpRecord): void;
  /** `subscribe` changes the connection's filter. */
  subscribe(vms: string[] | undefined): void;
}

type Handler<O extends OpName> = (
  ctl: Controller,
  args: ArgsOf<O>,
  ctx: OpContext,
) => Promise<Record<string, unknown>>;

/**
 * The op table: each op of the protocol as calls on the controller, the engine and the store —
 * the same calls the CLI makes. Stream work (snapshot, restore, verify) runs in a worker thread.
 */
export const HANDLERS: { [O in OpName]: Handler<O> } = {
  attach: async (ctl, args) => {
    const { vm, recovered } = await ctl.attach(args.qmp, args.name);
    return { ...describeVm(ctl, vm), recovered };
  },

  detach: async (ctl, args) => {
    await ctl.detach(args.vm);
    return { vm: args.vm, detached: true };
  },

  launch: async (ctl, args) => {
    const qmp = launchQmpPath(args.argv);
    const child = spawn(args.argv[0]!, args.argv.slice(1), { detached: true, stdio: 'ignore' });
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    child.once('error', () => undefined);
    child.unref();
    const deadline = Date.now() + 30_000;
    for (;;) {
      const code = await Promise.race([exited, sleep(100).then(() => undefined)]);
      if (code !== undefined)
        throw new DaemonError('QSNAP_DAEMON_PATH', `QEMU exited during start-up (${code})`, {
          hint: 'run the command line by hand to see why',
          details: { argv: args.argv },
        });
      const ok = await QmpClient.connect(qmp, { connectTimeoutMs: 1000 }).then(
        (c) => c.close().then(() => true),
        () => false,
      );
      if (ok) break;
      if (Date.now() > deadline) {
        if (child.pid) process.kill(child.pid, 'SIGKILL');
        throw new DaemonError('QSNAP_DAEMON_PATH', `QEMU did not open its QMP socket ${qmp} in time`, {
          hint: 'check the command line',
        });
      }
    }
    const { vm, recovered } = await ctl.attach(qmp, args.name);
    return { ...describeVm(ctl, vm), pid: child.pid, recovered };
  },

  vms: async (ctl, args) => {
    const answer = {
      vms: [...ctl.vms.values()].map((vm) => describeVm(ctl, vm)),
      daemon: {
        pid: process.pid,
        rssBytes: process.memoryUsage.rss(),
        eventLoopDelayMs: ctl.loopDelay(),
        maxStreams: ctl.streams.concurrency,
        streamsRunning: ctl.streams.pending,
        streamsWaiting: ctl.streams.size,
      },
    };
    if (args.resetStats) ctl.resetLoopDelay();
    return answer;
  },

  status: async (ctl, args) => {
    const vm = ctl.vm(args.vm);
    const state = await ctl.state(vm);
    return {
      ...describeVm(ctl, vm),
      state,
      info: { ...vm.info, runState: state, running: state === 'running' },
    };
  },

  snapshot: (ctl, args, ctx) => {
    const vm = ctl.vm(args.vm);
    const name = checkName(args.name);
    const op = ctl.newOp('snapshot', vm.id, true);
    ctx.begin(op);
    return ctl.run(
      op,
      (o) =>
        ctl.inWorker(o, {
          kind: 'snapshot',
          storeDir: ctl.store.dir,
          stateDir: ctl.store.stateDir,
          faults: ctl.options.faults,
          options: {
            qmp: vm.qmp,
            name,
            overwrite: args.overwrite ?? false,
            ...(args.maxBandwidth ? { maxBandwidth: args.maxBandwidth } : {}),
          },
        }),
      { stream: true, ...(args.wait === undefined ? {} : { wait: args.wait }) },
    );
  },

  restore: async (ctl, args, ctx) => {
    const name = checkName(args.name);
    await sweepStaleRunDirs();
    const op = ctl.newOp('restore', undefined, true);
    ctx.begin(op);
    return ctl.run(op, (o) => restoreAndAttach(ctl, o, { ...args, name }), { stream: true });
  },

  revert: async (ctl, args, ctx) => {
    const vm = ctl.vm(args.vm);
    const name = checkName(args.name);
    const op = ctl.newOp('revert', vm.id, true);
    ctx.begin(op);
    return ctl.run(
      op,
      async (o) => {
        o.cancellable = false;
        await stopQemu(vm);
        ctl.vms.delete(vm.id);
        return restoreAndAttach(ctl, o, { name, ...(args.lazy ? { lazy: true } : {}) }, vm);
      },
      { stream: true, ...(args.wait === undefined ? {} : { wait: args.wait }) },
    );
  },

  list: async (ctl) => ({ store: ctl.store.dir, snapshots: await ctl.listSnapshots() }),

  inspect: async (ctl, args) => {
    const entry = findSnapshot(await ctl.store.read(), checkName(args.name));
    const reader = await openSnapshot(ctl.store.snapshotPath(entry));
    try {
      return { name: entry.name, file: reader.path, fileBytes: reader.fileLength, manifest: reader.manifest };
    } finally {
      await reader.close();
    }
  },

  verify: async (ctl, args, ctx) => {
    const name = checkName(args.name);
    findSnapshot(await ctl.store.read(), name);
    const op = ctl.newOp('verify', undefined, true);
    ctx.begin(op);
    return ctl.run(
      op,
      (o) => ctl.inWorker(o, { kind: 'verify', storeDir: ctl.store.dir, stateDir: ctl.store.stateDir, name }),
      { stream: true },
    );
  },

  delete: async (ctl, args, ctx) => {
    const catalog = await ctl.store.read();
    const ids = [...new Set(args.names.map(checkName))].map((n) => findSnapshot(catalog, n).id);
    const op = ctl.newOp('delete', undefined, false);
    ctx.begin(op);
    return ctl.run(
      op,
      (o) =>
        collectNames(
          ctl,
          o,
          collect(ctl.store, { deleting: ids, dryRun: args.dryRun ?? false }),
          catalog.snapshots,
        ),
      { queue: ctl.storeQueue },
    );
  },

  gc: async (ctl, args, ctx) => {
    const op = ctl.newOp('gc', undefined, false);
    ctx.begin(op);
    return ctl.run(
      op,
      (o) =>
        forwardCollect(
          ctl,
          o,
          collect(ctl.store, { deleting: [], dryRun: args.dryRun ?? false, sweepRunDirs: true }),
        ),
      { queue: ctl.storeQueue },
    );
  },

  cancel: async (ctl, args) => {
    const op = ctl.cancel(args.op);
    return { op: op.id, state: op.state, phase: op.phase };
  },

  subscribe: async (ctl, args, ctx) => {
    for (const id of args.vms ?? []) ctl.vm(id);
    ctx.subscribe(args.vms);
    return { subscribed: args.vms ?? 'all', vms: [...ctl.vms.values()].map((vm) => describeVm(ctl, vm)) };
  },

  result: async (ctl, args) => {
    const op = ctl.op(args.op);
    return {
      op: op.id,
      kind: op.kind,
      state: op.state,
      phase: op.phase,
      ...(op.result ? { result: op.result } : {}),
      ...(op.error ? { error: op.error.toJSON() } : {}),
    };
  },
};

async function forwardCollect(
  ctl: Controller,
  op: OpRecord,
  inner: ReturnType<typeof collect>,
): Promise<Record<string, unknown>> {
  let seq = 0;
  inner.on((event) => ctl.onEngineEvent(op, event, () => seq++));
  return { ...(await inner.result) };
}

async function collectNames(
  ctl: Controller,
  op: OpRecord,
  inner: ReturnType<typeof collect>,
  names: Record<string, { name: string } | undefined>,
): Promise<Record<string, unknown>> {
  let seq = 0;
  inner.on((event) => ctl.onEngineEvent(op, event, () => seq++));
  const r = await inner.result;
  return { ...r, plan: { ...r.plan, snapshots: r.plan.snapshots.map((id) => names[id]?.name ?? id) } };
}

/** A VM as the protocol shows it: its state and its operations (running first, then the queue). */
export function describeVm(ctl: Controller, vm: AttachedVm): Record<string, unknown> {
  const now = performance.now();
  return {
    vm: vm.id,
    qmp: vm.qmp,
    ...(vm.name ? { name: vm.name } : {}),
    ...(vm.qemu ? { pid: vm.qemu.pid } : {}),
    state: vm.state,
    attachedAt: vm.attachedAt,
    operations: ctl.opsOf(vm.id).map((o) => ({
      op: o.id,
      kind: o.kind,
      state: o.state,
      phase: o.phase,
      ...(o.position === undefined ? {} : { position: o.position }),
      waitingMs: Math.round((o.startedAt ?? now) - o.requestedAt),
      ...(o.progress ? { progress: o.progress } : {}),
      cancellable: o.cancellable,
    })),
  };
}

/**
 * Restore a snapshot of the store in a worker (QEMU detached: it outlives the daemon) and attach
 * the restored VM — under `replacing`'s id for a revert.
 */
async function restoreAndAttach(
  ctl: Controller,
  op: OpRecord,
  args: Omit<ArgsOf<'restore'>, 'name'> & { name: string },
  replacing?: AttachedVm,
): Promise<Record<string, unknown>> {
  const result = await ctl.inWorker(op, {
    kind: 'restore',
    storeDir: ctl.store.dir,
    stateDir: ctl.store.stateDir,
    options: {
      name: args.name,
      lazy: args.lazy ?? false,
      paused: args.paused ?? false,
      ...(args.argv ? { argv: args.argv } : {}),
      trustCmdline: args.trustCmdline ?? false,
    },
  });
  const { vm } = await ctl.attach(String(result['qmp']), replacing?.name, replacing?.id);
  return { ...result, vm: vm.id };
}

/** Quit a VM's QEMU (a revert replaces it) and wait until its process is gone. */
async function stopQemu(vm: AttachedVm): Promise<void> {
  const qmp = await QmpClient.connect(vm.qmp, { connectTimeoutMs: 5000 });
  await qmp.execute('quit').catch(() => undefined);
  await qmp.close().catch(() => undefined);
  const deadline = Date.now() + 10_000;
  while (vm.qemu && isRunning(vm.qemu)) {
    if (Date.now() > deadline) {
      process.kill(vm.qemu.pid, 'SIGKILL');
      break;
    }
    await sleep(50);
  }
}

/**
 * The QMP socket a launch command line opens (`-qmp unix:PATH,server=on,wait=off`): the daemon
 * attaches there. Only a QEMU binary is launched.
 */
function launchQmpPath(argv: string[]): string {
  if (!basename(argv[0]!).startsWith('qemu-system-'))
    throw new DaemonError('QSNAP_DAEMON_PATH', `launch runs only QEMU (qemu-system-*), not ${argv[0]}`, {
      hint: 'give the QEMU command line, binary first',
    });
  const parsed = parseCommandLine(argv);
  const qmp = parsed.qmpSocket;
  if (!qmp)
    throw new DaemonError('QSNAP_DAEMON_PATH', 'the command line opens no QMP unix socket', {
      hint: 'add -qmp unix:/path/qmp.sock,server=on,wait=off',
    });
  return qmp;
}
