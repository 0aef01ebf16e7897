import { EventEmitter } from 'node:events';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import PQueue from 'p-queue';
import type { Faults } from '../engine/faults.js';
import type { OperationEvent } from '../engine/operation.js';
import { asQsnapError, type QsnapError } from '../errors.js';
import { listSnapshots, type SnapshotRow } from '../store/list.js';
import type { Store } from '../store/store.js';
import { DaemonError } from './errors.js';
import type { Event } from './protocol.js';
import {
  type AttachedVm,
  attachVm,
  checkQmpPath,
  newId,
  qemuAlive,
  queryState,
  readDaemonState,
  vmGone,
  writeDaemonState,
} from './vms.js';
import { runInWorker, type WorkerTask } from './worker-host.js';

export interface ControllerOptions {
  store: Store;
  /** Concurrent snapshot, restore and verify streams (default 2: they are I/O bound). */
  maxStreams: number;
  /** Test-only fault points, handed to each snapshot (engine/faults.ts). */
  faults: Faults;
  /** Run stream work on this thread instead of worker threads (measurements only). */
  inlineStreams?: boolean;
  log: (line: string) => void;
}

/** How long a run state read from QEMU answers status requests. */
const STATE_FRESH_MS = 200;
/** How long one listing answers `list` requests (unless the store changes first). */
const LIST_FRESH_MS = 1000;

/** An event before the server stamps the protocol version on it. */
export type EventBody = Event extends infer E ? (E extends unknown ? Omit<E, 'v'> : never) : never;

export type OpState = 'queued' | 'running' | 'done' | 'failed';

/** One long operation of the daemon (snapshot, restore, revert, verify, delete, gc). */
export interface OpRecord {
  id: string;
  kind: string;
  vm: string | undefined;
  state: OpState;
  requestedAt: number;
  startedAt: number | undefined;
  endedAt: number | undefined;
  phase: string;
  /** 1 = next to run on its VM; undefined once it runs. */
  position: number | undefined;
  progress: { doneBytes: number; totalBytes: number; etaMs?: number } | undefined;
  /** False once the operation is past the point where it can stop safely. */
  cancellable: boolean;
  cancel: (() => void) | undefined;
  /** Ends a queued operation at once (cancel). */
  rejectQueued: ((err: Error) => void) | undefined;
  result: Record<string, unknown> | undefined;
  error: QsnapError | undefined;
}

/**
 * The daemon's controller: the attached VMs, a queue per VM (one operation at a time), one
 * limit on concurrent streams, and the operations by id with their results kept after they end.
 * It never sees a connection: the server (server.ts) parses requests and calls it; what happens
 * is told as protocol events on `events` ('event', Event).
 */
export class Controller {
  readonly events = new EventEmitter();
  readonly vms = new Map<string, AttachedVm>();
  readonly ops = new Map<string, OpRecord>();
  readonly streams: PQueue;
  /** Store operations that change layers (delete, gc) run one at a time. */
  readonly storeQueue: PQueue = new PQueue({ concurrency: 1 });
  #watch: NodeJS.Timeout | undefined;
  /** `list` in flight or just answered, shared by every request until the store changes. */
  #list: { at: number; rows: Promise<SnapshotRow[]> } | undefined;
  readonly #loopDelay = monitorEventLoopDelay({ resolution: 10 });

  constructor(readonly options: ControllerOptions) {
    this.streams = new PQueue({ concurrency: options.maxStreams });
    this.events.setMaxListeners(0);
  }

  get store(): Store {
    return this.options.store;
  }

  /**
   * The store's snapshots. Listing reads every layer's header and who holds what in /proc: requests
   * that come while one runs, or within a second after, share it; a change of the store ends that.
   */
  listSnapshots(): Promise<SnapshotRow[]> {
    const now = performance.now();
    if (this.#list && now - this.#list.at < LIST_FRESH_MS) return this.#list.rows;
    const rows = listSnapshots(this.store);
    this.#list = { at: now, rows };
    rows.catch(() => {
      this.#list = undefined;
    });
    return rows;
  }

  /** The daemon's own event-loop delay since it started (ms): what stream work must not raise. */
  loopDelay(): { p50: number; p99: number; max: number } {
    const h = this.#loopDelay;
    const ms = (ns: number) => Math.round(ns / 1e4) / 100;
    return { p50: ms(h.percentile(50)), p99: ms(h.percentile(99)), max: ms(h.max) };
  }

  resetLoopDelay(): void {
    this.#loopDelay.reset();
  }

  emit(event: EventBody): void {
    if (event.event === 'store') this.#list = undefined;
    this.events.emit('event', { v: 1, ...event } as Event);
  }

  // ─── VMs ─────────────────────────────────────────────────────────────────────────────

  async attach(qmp: string, name?: string, id?: string): Promise<{ vm: AttachedVm; recovered: string[] }> {
    const path = await checkQmpPath(qmp);
    const known = [...this.vms.values()].find((v) => v.qmp === path && v.state !== 'gone');
    if (known) return { vm: known, recovered: [] };
    const { vm, recovered } = await attachVm(path, this.store.stateDir, id ?? newId('vm'), name);
    this.vms.set(vm.id, vm);
    await this.saveState();
    this.emit({ event: 'vm', vm: vm.id, change: 'attached', state: vm.state, ...(name ? { name } : {}) });
    return { vm, recovered };
  }

  async detach(id: string): Promise<void> {
    const vm = this.vm(id);
    // Whatever is queued on it goes first; the guest is not touched.
    await vm.queue.onIdle();
    this.vms.delete(id);
    await this.saveState();
    this.emit({ event: 'vm', vm: id, change: 'detached' });
  }

  vm(id: string): AttachedVm {
    const vm = this.vms.get(id);
    if (vm) return vm;
    throw new DaemonError('QSNAP_DAEMON_NO_VM', `no VM ${id} is attached`, {
      hint: 'see the vms op (qsnap --daemon … ) for the attached VMs, or attach it',
      details: { vm: id },
    });
  }

  /** Its run state: asked of QEMU when the VM is idle, as last seen while an operation holds QMP. */
  async state(vm: AttachedVm): Promise<string> {
    if (vm.state === 'gone') return 'gone';
    if (!qemuAlive(vm)) {
      this.markGone(vm);
      return 'gone';
    }
    // While an operation holds the VM's QMP socket, and for a moment after a query, the state
    // as last seen: a burst of status requests costs QEMU one connection.
    if (vm.queue.pending > 0 || performance.now() - vm.stateAt < STATE_FRESH_MS) return vm.state;
    try {
      const state = await queryState(vm);
      this.setState(vm, state);
    } catch {
      if (!qemuAlive(vm)) this.markGone(vm);
    }
    return vm.state;
  }

  setState(vm: AttachedVm, state: string): void {
    if (vm.state === state || vm.state === 'gone') return;
    vm.state = state;
    this.emit({ event: 'vm', vm: vm.id, change: 'state', state });
  }

  markGone(vm: AttachedVm): void {
    if (vm.state === 'gone') return;
    vm.state = 'gone';
    this.options.log(`VM ${vm.id} (${vm.qmp}): its QEMU exited`);
    this.emit({ event: 'vm', vm: vm.id, change: 'gone', state: 'gone' });
  }

  /** Operations of a VM: the one running, then the waiting ones in order. */
  opsOf(vm: string): OpRecord[] {
    return [...this.ops.values()]
      .filter((o) => o.vm === vm && (o.state === 'queued' || o.state === 'running'))
      .sort((a, b) => a.requestedAt - b.requestedAt);
  }

  // ─── operations ──────────────────────────────────────────────────────────────────────

  newOp(kind: string, vm: string | undefined, cancellable: boolean): OpRecord {
    const op: OpRecord = {
      id: newId('o'),
      kind,
      vm,
      state: 'queued',
      requestedAt: performance.now(),
      startedAt: undefined,
      endedAt: undefined,
      phase: 'queued',
      position: undefined,
      progress: undefined,
      cancellable,
      cancel: undefined,
      rejectQueued: undefined,
      result: undefined,
      error: undefined,
    };
    this.ops.set(op.id, op);
    return op;
  }

  /**
   * Run `work` as operation `op`: on its VM's queue when it has one (refused with QSNAP_BUSY when
   * `wait` is false and the VM is busy), then under the stream limit when `stream`.
   */
  run(
    op: OpRecord,
    work: (op: OpRecord) => Promise<Record<string, unknown>>,
    options: { wait?: boolean; stream?: boolean; queue?: PQueue },
  ): Promise<Record<string, unknown>> {
    const vm = op.vm ? this.vm(op.vm) : undefined;
    if (vm && vm.state === 'gone') return this.fail(op, vmGone(vm));
    if (vm && options.wait === false && (vm.queue.pending > 0 || vm.queue.size > 0))
      return this.fail(
        op,
        new DaemonError('QSNAP_BUSY', `VM ${vm.id} is running another operation`, {
          hint: 'ask again later, or without wait: false to take a place in its queue',
          details: { vm: vm.id, running: this.opsOf(vm.id).map((o) => o.id) },
        }),
      );
    const started = () => {
      if (vm && vm.state === 'gone') throw vmGone(vm);
      if (vm && !qemuAlive(vm)) {
        this.markGone(vm);
        throw vmGone(vm);
      }
      if (op.state !== 'queued') throw cancelled(op);
      op.state = 'running';
      op.startedAt = performance.now();
      op.position = undefined;
      this.phase(op, 'started');
      this.reposition(vm);
    };
    // The VM's turn first (its queue), then a stream slot: the operation starts in the slot.
    const go = async () => {
      started();
      return work(op);
    };
    const inSlot = () => (options.stream ? this.streams.add(go, { throwOnTimeout: true }) : go());
    const queue = vm?.queue ?? options.queue;
    const job = queue
      ? queue.add(
          async () => {
            await vm?.probe?.catch(() => undefined);
            return inSlot();
          },
          { throwOnTimeout: true },
        )
      : inSlot();
    if (vm) {
      op.position = this.opsOf(vm.id).filter((o) => o.state === 'queued').length;
      this.phase(op, 'queued');
    }
    const whileQueued = new Promise<never>((_, reject) => {
      op.rejectQueued = reject;
    });
    job.catch(() => undefined);
    return Promise.race([job, whileQueued]).then(
      (result) => this.succeed(op, result),
      (err: unknown) => this.fail(op, asQsnapError(err)),
    );
  }

  /** Run a stream task in a worker thread, its events turned into protocol events of `op`. */
  inWorker(op: OpRecord, task: WorkerTask): Promise<Record<string, unknown>> {
    let seq = 0;
    const run = runInWorker(task, (event) => this.onEngineEvent(op, event, () => seq++), {
      inline: this.options.inlineStreams ?? false,
    });
    op.cancel = run.cancel;
    return run.result;
  }

  onEngineEvent(op: OpRecord, event: OperationEvent, nextSeq: () => number): void {
    if (event.type === 'phase') {
      // A background snapshot cannot stop safely once the guest is paused for it (pause.ts).
      if (op.kind === 'snapshot' && ['pause', 'precopy'].includes(event.phase)) op.cancellable = false;
      if (op.kind === 'restore' && event.phase === 'launch') op.cancellable = false;
      this.phase(op, event.phase, event.detail);
    } else if (event.type === 'progress') {
      const elapsed = performance.now() - (op.startedAt ?? op.requestedAt);
      const etaMs =
        event.doneBytes > 0 && event.totalBytes > event.doneBytes
          ? Math.round((elapsed * (event.totalBytes - event.doneBytes)) / event.doneBytes)
          : undefined;
      op.progress = {
        doneBytes: event.doneBytes,
        totalBytes: event.totalBytes,
        ...(etaMs === undefined ? {} : { etaMs }),
      };
      this.emit({
        event: 'progress',
        op: op.id,
        ...this.ofVm(op),
        kind: op.kind,
        seq: nextSeq(),
        ...op.progress,
      });
    } else if (event.type === 'warning' || event.type === 'info')
      this.emit({
        event: 'info',
        op: op.id,
        ...this.ofVm(op),
        kind: op.kind,
        message: event.message,
        ...(event.type === 'warning' ? { code: event.code } : {}),
      });
  }

  phase(op: OpRecord, phase: string, detail?: string): void {
    op.phase = phase;
    this.emit({
      event: 'phase',
      op: op.id,
      ...this.ofVm(op),
      kind: op.kind,
      phase,
      ...(detail === undefined ? {} : { detail }),
      atMs: Math.round(performance.now() - op.requestedAt),
      ...(op.position === undefined ? {} : { position: op.position }),
    });
  }

  /** Tell every waiting operation of the VM its new place in the queue. */
  reposition(vm: AttachedVm | undefined): void {
    if (!vm) return;
    const waiting = this.opsOf(vm.id).filter((o) => o.state === 'queued');
    waiting.forEach((o, i) => {
      if (o.position === i + 1) return;
      o.position = i + 1;
      this.phase(o, 'queued');
    });
  }

  cancel(id: string): OpRecord {
    const op = this.op(id);
    if (op.state === 'queued') {
      op.state = 'failed';
      op.rejectQueued?.(cancelled(op));
      return op;
    }
    if (op.state !== 'running' || !op.cancellable || !op.cancel)
      throw new DaemonError(
        'QSNAP_DAEMON_NOT_CANCELLABLE',
        op.state === 'running'
          ? `operation ${id} (${op.kind}, phase ${op.phase}) cannot be cancelled safely now`
          : `operation ${id} has already ended`,
        { hint: 'wait for its result', details: { op: id, phase: op.phase, state: op.state } },
      );
    op.cancel();
    return op;
  }

  op(id: string): OpRecord {
    const op = this.ops.get(id);
    if (op) return op;
    throw new DaemonError('QSNAP_DAEMON_NO_OP', `no operation ${id} is known (or its result has expired)`, {
      hint: 'operation ids come in the events and replies of the request that started it',
      details: { op: id },
    });
  }

  succeed(op: OpRecord, result: Record<string, unknown>): Record<string, unknown> {
    op.state = 'done';
    op.endedAt = performance.now();
    op.result = result;
    this.emit({ event: 'result', op: op.id, ...this.ofVm(op), kind: op.kind, ok: true, result });
    if (['snapshot', 'restore', 'revert', 'delete', 'gc'].includes(op.kind)) this.emit({ event: 'store' });
    this.expire();
    return result;
  }

  fail(op: OpRecord, error: QsnapError): Promise<never> {
    op.state = 'failed';
    op.endedAt = performance.now();
    op.error = error;
    this.emit({
      event: 'result',
      op: op.id,
      ...this.ofVm(op),
      kind: op.kind,
      ok: false,
      error: error.toJSON(),
    });
    const vm = op.vm ? this.vms.get(op.vm) : undefined;
    if (vm && error.code !== 'QSNAP_DAEMON_VM_GONE' && !qemuAlive(vm)) this.markGone(vm);
    this.reposition(vm);
    this.expire();
    return Promise.reject(error);
  }

  ofVm(op: OpRecord): { vm?: string } {
    return op.vm ? { vm: op.vm } : {};
  }

  /** Results are kept for a while (LIMITS.keepResultsMs), at most `keep` of them. */
  expire(now = performance.now(), keepMs = 15 * 60_000, keep = 256): void {
    const ended = [...this.ops.values()].filter((o) => o.endedAt !== undefined);
    for (const [i, o] of ended.entries())
      if (now - o.endedAt! > keepMs || ended.length - i > keep) this.ops.delete(o.id);
  }

  // ─── start-up, restart and shutdown ──────────────────────────────────────────────────

  /** Re-attach the VMs a previous daemon had (recovering what it left half done on them). */
  async reattach(): Promise<string[]> {
    const lines: string[] = [];
    const previous = await readDaemonState(this.store.stateDir);
    for (const v of previous.vms) {
      try {
        const { vm, recovered } = await this.attach(v.qmp, v.name, v.id);
        lines.push(`re-attached VM ${vm.id} (${vm.qmp}), ${vm.state}`);
        for (const r of recovered) lines.push(`recovered ${vm.id}: ${r}`);
      } catch (err) {
        lines.push(`VM ${v.id} (${v.qmp}) not re-attached: ${asQsnapError(err).message}`);
      }
    }
    await this.saveState();
    return lines;
  }

  /** Watch the attached VMs' QEMUs: one that exits is marked gone at once. */
  watch(intervalMs = 500): void {
    this.#watch = setInterval(() => {
      for (const vm of this.vms.values()) if (vm.state !== 'gone' && !qemuAlive(vm)) this.markGone(vm);
    }, intervalMs);
    this.#watch.unref();
    this.#loopDelay.enable();
  }

  async close(): Promise<void> {
    if (this.#watch) clearInterval(this.#watch);
    this.#loopDelay.disable();
  }

  saveState(): Promise<void> {
    return writeDaemonState(
      this.store.stateDir,
      [...this.vms.values()].filter((v) => v.state !== 'gone'),
    );
  }
}

function cancelled(op: OpRecord): DaemonError {
  return new DaemonError('QSNAP_DAEMON_CANCELLED', `operation ${op.id} (${op.kind}) was cancelled`, {
    hint: 'nothing was changed; ask again when you want it',
    details: { op: op.id },
  });
}
