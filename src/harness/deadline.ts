import type { Operation, OperationEvent } from '../engine/operation.js';
import { MachineError } from './errors.js';

/** How long a Machine call may take, and who may cancel it. */
export interface CallOptions {
  /** Abort the call: what it had done is undone, and it rejects with QSNAP_MACHINE_ABORTED. */
  signal?: AbortSignal;
  /** Give up after this long: undone, rejects with QSNAP_MACHINE_TIMEOUT. */
  timeoutMs?: number;
  /** The operation's phase and progress events, as the CLI draws them. */
  onProgress?: (event: OperationEvent) => void;
}

export function throwIfAborted(what: string, options: CallOptions): void {
  if (options.signal?.aborted) throw aborted(what, options.signal.reason);
}

function aborted(what: string, reason: unknown): MachineError {
  return new MachineError('QSNAP_MACHINE_ABORTED', `${what} was aborted`, {
    hint: 'nothing of it is left; call it again when wanted',
    ...(reason === undefined ? {} : { cause: reason }),
  });
}

export function throwTimedOut(what: string, timeoutMs: number): never {
  throw timedOut(what, timeoutMs);
}

function timedOut(what: string, timeoutMs: number): MachineError {
  return new MachineError('QSNAP_MACHINE_TIMEOUT', `${what} did not finish within ${timeoutMs} ms`, {
    hint: 'the host may be overloaded; give it a longer timeoutMs',
    details: { timeoutMs },
  });
}

/**
 * Run an engine operation under the call's signal and timeout: either cancels it, waits for
 * its own clean-up (an operation undoes what it did when cancelled), then rejects with the
 * machine's code.
 */
export async function runOperation<T>(what: string, op: Operation<T>, options: CallOptions): Promise<T> {
  if (options.onProgress) op.on(options.onProgress);
  let cause: MachineError | undefined;
  const stop = (err: MachineError) => {
    cause ??= err;
    op.cancel(err);
  };
  const onAbort = () => stop(aborted(what, options.signal?.reason));
  options.signal?.addEventListener('abort', onAbort, { once: true });
  const timer =
    options.timeoutMs === undefined
      ? undefined
      : setTimeout(() => stop(timedOut(what, options.timeoutMs!)), options.timeoutMs);
  try {
    return await op.result;
  } catch (err) {
    throw cause ?? err;
  } finally {
    clearTimeout(timer);
    options.signal?.removeEventListener('abort', onAbort);
  }
}

/** For steps that are not operations (a launch): race them, and let `undo` clean up a late result. */
export async function withDeadline<T>(
  what: string,
  work: Promise<T>,
  options: CallOptions,
  undo: (value: T) => Promise<void>,
): Promise<T> {
  if (options.signal === undefined && options.timeoutMs === undefined) return work;
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  const gaveUp = new Promise<never>((_, reject) => {
    onAbort = () => reject(aborted(what, options.signal?.reason));
    options.signal?.addEventListener('abort', onAbort, { once: true });
    if (options.timeoutMs !== undefined) {
      timer = setTimeout(() => reject(timedOut(what, options.timeoutMs!)), options.timeoutMs);
    }
  });
  try {
    return await Promise.race([work, gaveUp]);
  } catch (err) {
    // The work may still finish: whatever it made goes.
    work.then(undo, () => undefined);
    throw err;
  } finally {
    clearTimeout(timer);
    if (onAbort) options.signal?.removeEventListener('abort', onAbort);
  }
}
