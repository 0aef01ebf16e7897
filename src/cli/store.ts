import { StoreError } from '../store/errors.js';
import { recoverStore } from '../store/recover.js';
import { Store } from '../store/store.js';
import type { CliEnv } from './env.js';
import type { Output } from './output.js';

/** The store a command works on (`--store DIR` wins over the environment), after recovering it. */
export async function openStore(env: CliEnv, dir: string | undefined, out: Output): Promise<Store> {
  const store = await Store.open({ dir: dir ?? env.storeDir, stateDir: env.stateDir });
  // A read-only store can still be listed: its recovery waits for a writable one.
  const actions = await recoverStore(store).catch((err) =>
    err instanceof StoreError && err.code === 'QSNAP_STORE_ACCESS' ? [] : Promise.reject(err),
  );
  for (const action of actions) out.text(`recovered: ${action}`);
  return store;
}

export const STORE_OPTION = { store: { type: 'string' } } as const;
export const STORE_HELP = {
  store: 'the snapshot store (default: $QSNAP_STORE, else $XDG_DATA_HOME/qsnap, ~/.local/share/qsnap)',
};
