import { QmpClient } from '../qmp/index.js';
import { type RecoveryReport, recoverStaleIntent } from './intent.js';

/**
 * Connect to a VM's QMP socket the way every qsnap command does: connect, then finish any
 * operation an earlier qsnap left half done on this VM (see intent.ts).
 */
export async function connectVm(
  qmpPath: string,
  options: { timeoutMs?: number } = {},
): Promise<{ qmp: QmpClient; recovery: RecoveryReport }> {
  const qmp = await QmpClient.connect(qmpPath, { connectTimeoutMs: options.timeoutMs ?? 5000 });
  try {
    const recovery = await recoverStaleIntent(qmpPath, qmp);
    return { qmp, recovery };
  } catch (err) {
    await qmp.close();
    throw err;
  }
}
