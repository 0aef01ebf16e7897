import { QmpClient } from '../qmp/index.js';
import { IntentStore } from './intent.js';
import { type RecoveryReport, recoverStaleIntent } from './snapshot/recovery.js';
import { defaultStateDir } from './state-dir.js';

export interface ConnectOptions {
  timeoutMs?: number;
  /** Where intent records live (default: defaultStateDir()). */
  stateDir?: string;
}

/**
 * Connect to a VM's QMP socket the way every qsnap command does: connect, then finish any
 * operation an earlier qsnap left half done on this VM (snapshot/recovery.ts).
 */
export async function connectVm(
  qmpPath: string,
  options: ConnectOptions = {},
): Promise<{ qmp: QmpClient; recovery: RecoveryReport }> {
  const intents = new IntentStore(options.stateDir ?? defaultStateDir());
  const qmp = await QmpClient.connect(qmpPath, { connectTimeoutMs: options.timeoutMs ?? 5000 });
  try {
    const recovery = await recoverStaleIntent(intents, qmpPath, qmp);
    return { qmp, recovery };
  } catch (err) {
    await qmp.close();
    throw err;
  }
}
