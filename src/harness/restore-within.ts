import type { OperationEvent } from '../engine/operation.js';
import { type RestoreOptions, type RestoreResult, restore } from '../engine/restore/restore.js';
import { type CallOptions, runOperation, throwIfAborted, throwTimedOut } from './deadline.js';

/**
 * A restore under a call's signal and timeout. Restore cannot be cancelled while QEMU loads,
 * so giving up takes effect at the first point where it can undo everything: when the new
 * QEMU answers (restore then stops it and removes its overlays).
 */
export async function restoreWithin(
  what: string,
  options: CallOptions,
  restoreOptions: RestoreOptions,
  onEvent?: (event: OperationEvent) => void,
): Promise<RestoreResult> {
  let gaveUp: 'aborted' | 'timeout' | undefined;
  const onAbort = () => {
    gaveUp ??= 'aborted';
  };
  options.signal?.addEventListener('abort', onAbort, { once: true });
  const timer =
    options.timeoutMs === undefined ? undefined : setTimeout(() => (gaveUp ??= 'timeout'), options.timeoutMs);
  try {
    const op = restore({
      ...restoreOptions,
      onLaunched: async (qemu) => {
        if (gaveUp === 'aborted') throwIfAborted(what, { signal: AbortSignal.abort(options.signal?.reason) });
        if (gaveUp === 'timeout') throwTimedOut(what, options.timeoutMs!);
        await restoreOptions.onLaunched?.(qemu);
      },
    });
    if (onEvent) op.on(onEvent);
    return await runOperation(what, op, options.onProgress ? { onProgress: options.onProgress } : {});
  } finally {
    clearTimeout(timer);
    options.signal?.removeEventListener('abort', onAbort);
  }
}
