import type { Operation, OperationEvent } from '../engine/operation.js';
import { UsageError } from './args.js';
import type { CliEnv } from './env.js';
import type { Output } from './output.js';
import { ProgressBar } from './progress.js';

/**
 * Run an operation the way every command does: a progress bar on a terminal, its notes (the
 * recovery of an earlier qsnap) and warnings collected for the report, Ctrl-C cancels it; and
 * the test-only fault `kill-at:<phase>` (engine/faults.ts), which SIGKILLs this process the
 * moment the operation enters that phase — as if qsnap died there.
 */
export async function runOperation<T>(
  op: Operation<T>,
  out: Output,
  env: CliEnv,
): Promise<{ result: T; notes: string[] }> {
  const bar = new ProgressBar(!out.json);
  const notes: string[] = [];
  const killAt = env.killAtPhases;
  op.on(bar.onEvent).on((event: OperationEvent) => {
    if (event.type === 'phase' && killAt.has(event.phase)) process.kill(process.pid, 'SIGKILL');
    if (event.type === 'info') notes.push(event.message);
    if (event.type === 'warning' && !bar.enabled) notes.push(`warning: ${event.message} [${event.code}]`);
  });
  const cancel = () => op.cancel(new UsageError('interrupted'));
  process.once('SIGINT', cancel);
  try {
    return { result: await op.result, notes };
  } finally {
    bar.clear();
    process.off('SIGINT', cancel);
  }
}
