import { connect, type DaemonClient } from '../client/client.js';
import type { Event } from '../daemon/protocol.js';
import type { WarningCode } from '../engine/errors.js';
import { Operation } from '../engine/operation.js';
import { UsageError } from './args.js';
import type { CliEnv } from './env.js';

/**
 * `--daemon URL` (or QSNAP_DAEMON): a command runs in `qsnap serve` instead of this process. Its
 * call is wrapped as an Operation, the daemon's events turned back into the engine's, so the
 * command's progress bar, Ctrl-C and report are the same code as for a local run.
 */
export function remoteOperation<T>(
  env: CliEnv,
  call: (client: DaemonClient, onEvent: (e: Event) => void) => Promise<T>,
): Operation<T> {
  return new Operation(async (op) => {
    const client = await connectDaemon(env);
    let opId: string | undefined;
    const onAbort = () => {
      if (opId) void client.cancel({ op: opId }).catch(() => undefined);
    };
    op.signal.addEventListener('abort', onAbort);
    try {
      return await call(client, (e) => {
        opId ??= e.op;
        if (e.event === 'phase') op.phase(e.phase, e.detail);
        else if (e.event === 'progress') op.progress(e.doneBytes, e.totalBytes);
        else if (e.event === 'info')
          if (e.code) op.warn(e.code as WarningCode, e.message);
          else op.emit({ type: 'info', message: e.message });
      });
    } finally {
      op.signal.removeEventListener('abort', onAbort);
      await client.close();
    }
  });
}

/** A short call to the daemon (no progress): connect, ask, hang up. */
export async function withDaemon<T>(env: CliEnv, call: (client: DaemonClient) => Promise<T>): Promise<T> {
  const client = await connectDaemon(env);
  try {
    return await call(client);
  } finally {
    await client.close();
  }
}

function connectDaemon(env: CliEnv): Promise<DaemonClient> {
  if (!env.daemonUrl) throw new UsageError('no daemon given', 'pass --daemon ws://127.0.0.1:PORT/v1');
  return connect(env.daemonUrl, { stateDir: env.stateDir });
}

/** Options a command cannot take when the daemon runs it (it only writes into its own store). */
export function refuseWithDaemon(command: string, given: Record<string, unknown>, names: string[]): void {
  for (const name of names)
    if (given[name] !== undefined)
      throw new UsageError(
        `${command}: --${name} is not available with --daemon`,
        'the daemon works on its own store and the VMs it has attached; run without --daemon',
      );
}

/** `--daemon URL` / `--daemon=URL` taken out of a command's arguments (before any `--`). */
export function takeDaemonFlag(argv: string[]): { argv: string[]; url: string | undefined } {
  const dash = argv.indexOf('--');
  const head = dash >= 0 ? argv.slice(0, dash) : argv;
  const tail = dash >= 0 ? argv.slice(dash) : [];
  let url: string | undefined;
  const rest: string[] = [];
  for (let i = 0; i < head.length; i++) {
    const a = head[i]!;
    if (a === '--daemon') {
      url = head[++i];
      if (!url) throw new UsageError('--daemon needs a URL', 'e.g. --daemon ws://127.0.0.1:7325/v1');
    } else if (a.startsWith('--daemon=')) url = a.slice('--daemon='.length);
    else rest.push(a);
  }
  return { argv: [...rest, ...tail], url };
}
