import { existsSync } from 'node:fs';
import { readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { connectVm } from '../engine/connect.js';
import { IntentSchema } from '../engine/intent.js';
import { QmpClient } from '../qmp/index.js';
import { isRunning } from '../vm/process.js';
import { hasOwnData } from '../vm/qemu-img.js';

/**
 * Intent records of qsnaps that died (engine/intent.ts), cleared by gc: one whose VM still
 * answers is recovered as any command would (the VM put back); one whose VM is gone leaves
 * its temporary files (stream sockets, partial snapshot files) and the overlays it prepared
 * that hold no data — an overlay the guest wrote to is the latest state of that disk and stays.
 */
export async function sweepStaleIntents(stateDir: string, options: { dryRun: boolean }): Promise<string[]> {
  const dir = join(stateDir, 'intents');
  const done: string[] = [];
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    if (!name.endsWith('.json')) continue;
    const path = join(dir, name);
    const parsed = IntentSchema.safeParse(await readJson(path));
    if (!parsed.success || isRunning(parsed.data.owner)) continue;
    const intent = parsed.data;
    if (await answers(intent.qmp)) {
      if (!options.dryRun) await (await connectVm(intent.qmp, { stateDir })).qmp.close();
      done.push(`recovered the interrupted qsnap on ${intent.qmp}`);
      continue;
    }
    const files = [...intent.tempFiles];
    for (const o of intent.overlays) {
      if (!o.inUse && !(await hasOwnData(o.overlayFile).catch(() => true))) files.push(o.overlayFile);
      else if (existsSync(o.overlayFile))
        done.push(`keep ${o.overlayFile} (holds what the guest wrote last)`);
    }
    if (!options.dryRun)
      for (const file of [...files, path]) await rm(file, { recursive: true, force: true });
    done.push(...files.map((f) => `${f} (left by a qsnap that died working on a VM that is gone)`));
  }
  return done;
}

async function readJson(path: string): Promise<unknown> {
  try {
    return JSON.parse(await readFile(path, 'utf8'));
  } catch {
    return undefined;
  }
}

async function answers(qmp: string): Promise<boolean> {
  try {
    await (await QmpClient.connect(qmp, { connectTimeoutMs: 1000 })).close();
    return true;
  } catch {
    return false;
  }
}
