import { EventEmitter } from 'node:events';
import { QsnapError } from '../errors.js';
import type { WarningCode } from './errors.js';

/**
 * A long-running engine operation (snapshot, restore, verify): it reports what it is doing
 * as typed events and ends with a result. Front ends only listen: the CLI draws a progress
 * bar or prints JSON, the library forwards callbacks, the daemon will forward events over
 * its WebSocket. Nothing in the engine prints.
 */
export type OperationEvent =
  | { type: 'phase'; phase: string; detail?: string; atMs: number }
  | { type: 'progress'; doneBytes: number; totalBytes: number; detail?: string }
  | { type: 'warning'; code: WarningCode; message: string }
  | { type: 'info'; message: string; data?: Record<string, unknown> };

export type EventListener = (event: OperationEvent) => void;

export class Operation<T> {
  readonly result: Promise<T>;
  readonly #emitter = new EventEmitter();
  readonly #abort = new AbortController();
  readonly #startedAt = performance.now();
  /** The phase the operation is in: a failure names it (details.phase). */
  #phase: string | undefined;

  constructor(run: (op: OperationContext) => Promise<T>) {
    const emit = (event: OperationEvent) => {
      if (event.type === 'phase') this.#phase = event.phase;
      this.#emitter.emit('event', event);
    };
    const context: OperationContext = {
      signal: this.#abort.signal,
      emit,
      phase: (phase, detail) =>
        emit({
          type: 'phase',
          phase,
          ...(detail === undefined ? {} : { detail }),
          atMs: performance.now() - this.#startedAt,
        }),
      progress: (doneBytes, totalBytes, detail) =>
        this.#emitter.emit('event', {
          type: 'progress',
          doneBytes,
          totalBytes,
          ...(detail === undefined ? {} : { detail }),
        }),
      warn: (code, message) => this.#emitter.emit('event', { type: 'warning', code, message }),
    };
    // Start on the next tick so listeners attached right after construction see every event.
    this.result = Promise.resolve()
      .then(() => run(context))
      .catch((err: unknown) => {
        if (err instanceof QsnapError && err.details['phase'] === undefined && this.#phase !== undefined)
          err.details['phase'] = this.#phase;
        throw err;
      });
    // The caller awaits `result`; this keeps an unobserved rejection from crashing the process.
    this.result.catch(() => undefined);
  }

  on(listener: EventListener): this {
    this.#emitter.on('event', listener);
    return this;
  }

  /** Ask the operation to stop; it cleans up and rejects its result with a cancelled error. */
  cancel(reason?: unknown): void {
    this.#abort.abort(reason);
  }
}

export interface OperationContext {
  signal: AbortSignal;
  emit(event: OperationEvent): void;
  phase(phase: string, detail?: string): void;
  progress(doneBytes: number, totalBytes: number, detail?: string): void;
  warn(code: WarningCode, message: string): void;
}
