import { constants } from 'node:fs';
import { access, readdir, readFile, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { findQmpPeer } from '../../vm/peer.js';
import { SnapshotError } from '../errors.js';
import type { Faults } from '../faults.js';
import { MIGRATION_UNSETTLED } from '../migration.js';
import { type VmInfo, versionAtLeast } from '../probe.js';
import type { StreamTransport } from './receiver.js';
import type { SnapshotStrategy } from './types.js';

/** Devices whose state lives outside QEMU's migration stream, which background snapshots refuse. */
const UNSUPPORTED_DEVICES = ['vfio-pci', 'vfio-pci-nohotplug', 'vfio-ccw', 'vfio-ap', 'vfio-platform'];

/**
 * Everything that can be checked before the VM is touched: its run state gives the strategy;
 * a migration under way or a passthrough device is refused.
 */
export function preflight(vm: VmInfo): SnapshotStrategy {
  const strategy = chooseStrategy(vm);
  if (MIGRATION_UNSETTLED.has(vm.migrationStatus ?? 'none')) {
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_BUSY',
      `a migration of this VM is already ${vm.migrationStatus}`,
      {
        hint: 'wait for it to finish or cancel it (migrate_cancel), then retry',
      },
    );
  }
  const blocking = vm.deviceTypes.filter((t) => UNSUPPORTED_DEVICES.includes(t));
  if (blocking.length) {
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_UNSUPPORTED',
      `devices ${blocking.join(', ')} cannot be snapshotted live`,
      { hint: 'detach passthrough devices before snapshotting', details: { devices: blocking } },
    );
  }
  if (vm.migrationBlockers.length) {
    // QEMU would refuse the migration itself (after qsnap paused the guest and froze its disks).
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_UNSUPPORTED',
      `QEMU cannot migrate this VM: ${vm.migrationBlockers.join('; ')}`,
      {
        hint: 'detach or unmount what QEMU names (a non-migratable device, a mounted 9p share…), then retry',
        details: { blockers: vm.migrationBlockers },
      },
    );
  }
  const temporary = vm.disks.filter((d) => d.temporary);
  if (temporary.length) {
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_UNSUPPORTED',
      `disk ${temporary.map((d) => d.device).join(', ')} runs on QEMU's temporary -snapshot overlay, ` +
        'which QEMU deletes when it exits: a snapshot of it could never be restored',
      {
        hint: 'start QEMU without -snapshot / snapshot=on: a qsnap snapshot already keeps the disk as it was',
        details: { disks: temporary.map((d) => d.device) },
      },
    );
  }
  return strategy;
}

function chooseStrategy(vm: VmInfo): SnapshotStrategy {
  if (vm.running) return 'background-snapshot';
  if (vm.runState === 'paused' || vm.runState === 'suspended') {
    // QEMU 7.2–8.2 resume the guest after a background snapshot's capture even if it was
    // paused (migration.c bg_migration_vm_start_bh); a paused guest is already frozen, so a
    // plain migration of it is point-in-time and leaves it stopped. ≥ 9.0 keep the state.
    return versionAtLeast(vm.qemu.version, 9, 0) ? 'background-snapshot' : 'stopped-precopy';
  }
  throw new SnapshotError(
    'QSNAP_SNAPSHOT_UNSUPPORTED',
    `the VM is ${vm.runState}; only a running or paused VM can be snapshotted`,
    {
      hint: vm.runState === 'postmigrate' ? 'resume it with `cont` first' : 'start the guest first',
      details: { runState: vm.runState },
    },
  );
}

/**
 * The strategy when QEMU cannot write-protect guest RAM (ram-protection.ts): a pre-copy
 * migration. Live (the guest runs while RAM is sent) only where QEMU's dirty tracking is
 * exact; otherwise qsnap pauses the guest for the whole migration (stopped-precopy, resumed
 * afterwards): point-in-time, at the cost of a pause as long as the transfer.
 */
export function precopyStrategy(vm: VmInfo, faults: Faults): SnapshotStrategy {
  if (!vm.running) return 'stopped-precopy';
  return dirtyTrackingExact(vm) || faults.has('live-precopy-on-tcg') ? 'live-precopy' : 'stopped-precopy';
}

/**
 * Whether a pre-copy migration sees every guest write. Not under TCG before QEMU 9.0: the fast
 * path of the dirty bitmap sync clears bits without resetting the TCG TLB, so stores through
 * entries cached before the sync set no dirty bit and are never resent (QEMU commit 03bfc2188f,
 * "physmem: Fix migration dirty bitmap coherency with TCG memory access", in 9.0). Measured on
 * 7.2: 48–81 pages of the final RAM missing from every pre-copy of the busy test guest that took
 * 20 passes or more, the restored guest crashing; none on 10.0. KVM's dirty log is kernel-side.
 */
export function dirtyTrackingExact(vm: VmInfo): boolean {
  return vm.accel === 'kvm' || versionAtLeast(vm.qemu.version, 9, 0);
}

/** The output's directory is writable and, unless `overwrite`, nothing is at `out` yet. */
export async function checkOutput(out: string, overwrite: boolean): Promise<void> {
  const dir = dirname(out);
  try {
    await access(dir, constants.W_OK);
  } catch (err) {
    throw new SnapshotError('QSNAP_SNAPSHOT_OUTPUT', `cannot write to ${dir}`, {
      hint: 'choose an --out path in a writable directory',
      cause: err,
    });
  }
  if (overwrite) return;
  const exists = await stat(out).then(
    () => true,
    () => false,
  );
  if (exists) {
    throw new SnapshotError('QSNAP_SNAPSHOT_OUTPUT', `${out} already exists`, {
      hint: 'choose another --out path or pass --overwrite',
    });
  }
}

/** The local QEMU process behind the QMP endpoint, if qsnap can see it. */
export async function qemuPidOf(qmpEndpoint: string): Promise<number | undefined> {
  const peer = await findQmpPeer(qmpEndpoint).catch(() => undefined);
  return peer?.found ? peer.pid : undefined;
}

/**
 * The stream's transport when the user did not choose one: QEMU's pipe (pipe-source.ts) where
 * QEMU is local, qsnap may read its /proc (the same user, or root) and QEMU may spawn the
 * placeholder (`-sandbox …,spawn=deny` forbids it); a unix socket otherwise.
 */
export async function chooseTransport(qemuPid: number | undefined): Promise<StreamTransport> {
  if (qemuPid === undefined) return 'unix';
  try {
    await readdir(`/proc/${qemuPid}/fd`);
  } catch {
    return 'unix';
  }
  const argv = await readFile(`/proc/${qemuPid}/cmdline`, 'utf8').catch(() => '');
  return /spawn=deny/.test(argv) ? 'unix' : 'pipe';
}
