import { homedir } from 'node:os';
import { join, resolve } from 'node:path';

/**
 * Where qsnap keeps its per-VM intent records: `$QSNAP_STATE_DIR`, else
 * `$XDG_STATE_HOME/qsnap`, else `~/.local/state/qsnap`. Read once where an operation starts
 * (operations take `stateDir` as an option); nothing below that reads the environment.
 */
export function defaultStateDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env['QSNAP_STATE_DIR']) return resolve(env['QSNAP_STATE_DIR']);
  const base = env['XDG_STATE_HOME'] || join(homedir(), '.local', 'state');
  return join(base, 'qsnap');
}
