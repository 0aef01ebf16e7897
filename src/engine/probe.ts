import type { QmpClient } from '../qmp/index.js';
import { plainFilename } from '../vm/image-chain.js';

export interface QemuVersion {
  major: number;
  minor: number;
  micro: number;
}

export interface DiskInfo {
  /** The drive's name (BlockBackend), or its qdev id when it was attached with -blockdev. */
  device: string;
  qdev: string | undefined;
  /** Top node the device reads and writes (the one a snapshot freezes). */
  nodeName: string | undefined;
  file: string | undefined;
  format: string | undefined;
  virtualSize: number | undefined;
  backingFile: string | undefined;
  /** The image and its backing files, top first (absolute where QEMU knows them). */
  chain: string[];
  readOnly: boolean;
  removable: boolean;
  inserted: boolean;
  /** Its top image is the temporary overlay of QEMU's `-snapshot` / `snapshot=on`, deleted when QEMU exits. */
  temporary: boolean;
}

export interface VmInfo {
  qemu: { version: QemuVersion; package: string; text: string };
  /** Machine type as the migration stream names it, e.g. `pc-i440fx-7.2`. */
  machine: string;
  runState: string;
  running: boolean;
  ramBytes: number;
  accel: 'kvm' | 'tcg';
  name: string | undefined;
  migrationStatus: string | undefined;
  /** Why QEMU would refuse any outgoing migration now (`query-migrate`'s blocked-reasons, QEMU ≥ 6.0). */
  migrationBlockers: string[];
  disks: DiskInfo[];
  /** QOM types of user-created devices (`-device`), e.g. `virtio-blk-pci`, `vfio-pci`. */
  deviceTypes: string[];
}

export function versionAtLeast(v: QemuVersion, major: number, minor = 0): boolean {
  return v.major > major || (v.major === major && v.minor >= minor);
}

function imageChain(image: { filename: string; 'backing-image'?: unknown } | undefined): string[] {
  const chain: string[] = [];
  let current = image as { filename: string; 'backing-image'?: unknown } | undefined;
  while (current) {
    chain.push(plainFilename(current.filename) ?? current.filename);
    current = current['backing-image'] as typeof current;
  }
  return chain;
}

/** The device's short name: a qdev path `/machine/peripheral/disk0-dev/virtio-backend` gives `disk0-dev`. */
function deviceName(device: string, qdev: string | undefined): string {
  if (device) return device;
  if (!qdev) return '';
  const match = /\/machine\/peripheral\/([^/]+)/.exec(qdev);
  return match?.[1] ?? qdev;
}

async function listDeviceTypes(qmp: QmpClient): Promise<string[]> {
  const types: string[] = [];
  for (const path of ['/machine/peripheral', '/machine/peripheral-anon']) {
    try {
      for (const prop of await qmp.execute('qom-list', { path })) {
        const match = /^child<(.+)>$/.exec(prop.type);
        if (match?.[1]) types.push(match[1]);
      }
    } catch {
      // peripheral-anon is absent when every device has an id
    }
  }
  return types;
}

/** The machine type as the migration stream names it: QOM says `pc-i440fx-7.2-machine`. */
export async function readMachineType(qmp: QmpClient): Promise<string> {
  const type = await qmp.execute('qom-get', { path: '/machine', property: 'type' });
  return String(type).replace(/-machine$/, '');
}

/** Guest RAM in bytes: base memory plus hot-plugged memory. */
export async function readRamBytes(qmp: QmpClient): Promise<number> {
  const memory = await qmp.execute('query-memory-size-summary');
  return memory['base-memory'] + (memory['plugged-memory'] ?? 0);
}

/**
 * QEMU's `-snapshot` puts every drive under a qcow2 overlay it creates as `$TMPDIR/vl.XXXXXX`
 * (default /var/tmp; block.c get_tmp_filename) and deletes when it closes the drive.
 */
function isTemporaryOverlay(filename: string): boolean {
  return /\/vl\.[A-Za-z0-9]{6}$/.test(plainFilename(filename) ?? '');
}

async function readDisks(qmp: QmpClient): Promise<DiskInfo[]> {
  return (await qmp.execute('query-block')).map((block) => {
    const inserted = block.inserted;
    return {
      device: deviceName(block.device, block.qdev),
      qdev: block.qdev,
      nodeName: inserted?.['node-name'],
      file: inserted ? (plainFilename(inserted.image.filename) ?? inserted.image.filename) : undefined,
      format: inserted?.image.format ?? inserted?.drv,
      virtualSize: inserted?.image['virtual-size'],
      backingFile: inserted?.image['full-backing-filename'] ?? inserted?.image['backing-filename'],
      readOnly: inserted?.ro ?? true,
      chain: imageChain(inserted?.image),
      removable: block.removable,
      inserted: inserted !== undefined,
      temporary: inserted !== undefined && isTemporaryOverlay(inserted.image.filename),
    };
  });
}

/** Everything qsnap needs to know about a running QEMU before it acts on it. */
export async function probeVm(qmp: QmpClient): Promise<VmInfo> {
  const [version, status, machine, ramBytes, kvm, name, migration, disks, deviceTypes] = await Promise.all([
    qmp.execute('query-version'),
    qmp.execute('query-status'),
    readMachineType(qmp),
    readRamBytes(qmp),
    qmp.execute('query-kvm'),
    qmp.execute('query-name'),
    qmp.execute('query-migrate'),
    readDisks(qmp),
    listDeviceTypes(qmp),
  ]);
  const v = version.qemu;
  return {
    qemu: {
      version: { major: v.major, minor: v.minor, micro: v.micro },
      package: version.package,
      text: `${v.major}.${v.minor}.${v.micro}`,
    },
    machine,
    runState: status.status,
    running: status.running,
    ramBytes,
    accel: kvm.enabled ? 'kvm' : 'tcg',
    name: name.name,
    migrationStatus: migration.status,
    migrationBlockers: migration['blocked-reasons'] ?? [],
    deviceTypes,
    disks,
  };
}
