import { type Faults, parseFaults } from '../engine/faults.js';
import { defaultStateDir } from '../engine/state-dir.js';
import { defaultStoreDir } from '../store/store.js';
import { UsageError } from './args.js';

/**
 * What the CLI takes from its environment, read once at start-up and handed to the commands:
 * nothing below the CLI reads the environment.
 */
export interface CliEnv {
  /** Intent records: `$QSNAP_STATE_DIR`, else `$XDG_STATE_HOME/qsnap`. */
  stateDir: string;
  /** The snapshot store: `$QSNAP_STORE`, else `$XDG_DATA_HOME/qsnap` (`--store` wins). */
  storeDir: string;
  /** Test-only fault points from `QSNAP_FAULT` (engine/faults.ts). */
  faults: Faults;
  /** Test-only: `QSNAP_FAULT=kill-at:<phase>` SIGKILLs the CLI when an operation enters that phase. */
  killAtPhases: ReadonlySet<string>;
  /** `--daemon URL`, else `$QSNAP_DAEMON`: the commands run in `qsnap serve`. */
  daemonUrl: string | undefined;
  /** `qsnap serve` only: `QSNAP_DAEMON_INLINE=1` runs stream work on the event loop (measurements). */
  daemonInline: boolean;
}

export function readCliEnv(env: NodeJS.ProcessEnv = process.env): CliEnv {
  const names = (env['QSNAP_FAULT'] ?? '').split(',');
  const killAtPhases = new Set(
    names.filter((n) => n.startsWith('kill-at:')).map((n) => n.slice('kill-at:'.length)),
  );
  let faults: Faults;
  try {
    faults = parseFaults(names.filter((n) => !n.startsWith('kill-at:')).join(','));
  } catch (err) {
    throw new UsageError(
      `QSNAP_FAULT: ${(err as Error).message}`,
      'unset QSNAP_FAULT (it is for qsnap’s own tests)',
    );
  }
  return {
    stateDir: defaultStateDir(env),
    storeDir: defaultStoreDir(env),
    faults,
    killAtPhases,
    daemonUrl: env['QSNAP_DAEMON'] || undefined,
    daemonInline: env['QSNAP_DAEMON_INLINE'] === '1',
  };
}
