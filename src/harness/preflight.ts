import { stat } from 'node:fs/promises';
import { pairDisks } from '../engine/restore/disk-pairing.js';
import { checkLazy } from '../engine/restore/lazy.js';
import { QsnapError } from '../errors.js';
import { openSnapshot } from '../format/index.js';
import type { ParsedCommandLine } from '../vm/cmdline.js';
import type { Checkpoint } from './checkpoints.js';
import { MachineError } from './errors.js';

/** What a checkpoint must fit: the machine it is reverted into. */
export interface RevertTarget {
  parsed: ParsedCommandLine;
  ramBytes: number;
  machineType: string;
  lazy: boolean;
}

/**
 * Everything a revert can check before it touches the running QEMU: the file is there and
 * its trailer and manifest verify, it is the checkpoint it claims to be, and its RAM size,
 * machine type and disks fit this machine's command line (each frozen layer present and
 * paired with a writable disk).
 */
export async function checkCheckpoint(checkpoint: Checkpoint, target: RevertTarget): Promise<void> {
  try {
    await stat(checkpoint.file);
  } catch (err) {
    throw new MachineError(
      'QSNAP_MACHINE_CHECKPOINT_MISSING',
      `checkpoint "${checkpoint.name}": its file ${checkpoint.file} is gone`,
      { hint: 'take the checkpoint again; the running guest was not touched', cause: err },
    );
  }
  const reader = await openSnapshot(checkpoint.file).catch((err: unknown) => {
    throw mismatch(checkpoint, `its file does not verify (${(err as Error).message})`, err);
  });
  try {
    const m = reader.manifest;
    if (m.id !== checkpoint.id)
      throw mismatch(checkpoint, `its file holds snapshot ${m.id}, not ${checkpoint.id}`);
    if (m.vm.ramBytes !== target.ramBytes) {
      throw mismatch(checkpoint, `it has ${m.vm.ramBytes} bytes of RAM, this machine ${target.ramBytes}`);
    }
    if (m.qemu.machine !== target.machineType) {
      throw mismatch(checkpoint, `it has machine type ${m.qemu.machine}, this machine ${target.machineType}`);
    }
    for (const disk of m.disks) {
      try {
        await stat(disk.frozenFile);
      } catch (err) {
        throw new MachineError(
          'QSNAP_MACHINE_CHECKPOINT_MISSING',
          `checkpoint "${checkpoint.name}": its disk layer ${disk.frozenFile} is gone`,
          { hint: 'take the checkpoint again; the running guest was not touched', cause: err },
        );
      }
    }
    await pairDisks(m, target.parsed.disks, { overlayDir: undefined, tag: '00000000' }).catch((err) => {
      throw mismatch(checkpoint, `its disks do not fit this machine (${(err as Error).message})`, err);
    });
    if (target.lazy) {
      try {
        checkLazy(target.parsed, m);
      } catch (err) {
        if (err instanceof QsnapError) throw err;
        throw mismatch(checkpoint, (err as Error).message, err);
      }
    }
  } finally {
    await reader.close();
  }
}

function mismatch(checkpoint: Checkpoint, why: string, cause?: unknown): MachineError {
  return new MachineError('QSNAP_MACHINE_CHECKPOINT_MISMATCH', `checkpoint "${checkpoint.name}": ${why}`, {
    hint: 'revert to a checkpoint of this machine, or start one from it with Machine.fromCheckpoint; the running guest was not touched',
    ...(cause === undefined ? {} : { cause }),
  });
}
