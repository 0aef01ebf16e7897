import { type Faults, NO_FAULTS } from '../engine/faults.js';
import { recoverStore } from '../store/recover.js';
import { Store } from '../store/store.js';
import { Controller } from './controller.js';
import { DaemonServer, type Listen } from './server.js';
import { loadOrCreateToken, tokenPath } from './token.js';

export interface DaemonOptions {
  storeDir: string;
  stateDir: string;
  listen: Listen;
  maxStreams?: number;
  faults?: Faults;
  /** Stream work on the event loop instead of worker threads (measurements only). */
  inlineStreams?: boolean;
  log?: (line: string) => void;
}

export interface RunningDaemon {
  url: string;
  tokenFile: string;
  controller: Controller;
  /** What the start found and did: store recoveries, VMs re-attached. */
  startup: string[];
  close(): Promise<void>;
}

/**
 * Start `qsnap serve`: the token (refused when others can read it), the store recovered as every
 * CLI command does, the VMs of a previous daemon re-attached (each recovered like the CLI would),
 * then the server.
 */
export async function startDaemon(options: DaemonOptions): Promise<RunningDaemon> {
  const log = options.log ?? (() => undefined);
  const token = await loadOrCreateToken(options.stateDir);
  const store = await Store.open({ dir: options.storeDir, stateDir: options.stateDir });
  const startup = (await recoverStore(store)).map((a) => `recovered: ${a}`);
  const controller = new Controller({
    store,
    maxStreams: options.maxStreams ?? 2,
    faults: options.faults ?? NO_FAULTS,
    inlineStreams: options.inlineStreams ?? false,
    log,
  });
  startup.push(...(await controller.reattach()));
  const server = new DaemonServer({ controller, token, listen: options.listen, log });
  const url = await server.listen();
  controller.watch();
  return {
    url,
    tokenFile: tokenPath(options.stateDir),
    controller,
    startup,
    close: async () => {
      await server.close();
      await controller.close();
    },
  };
}
