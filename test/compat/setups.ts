/**
 * The QEMU set-ups users run, as the compatibility suite boots them: the bundled test guest on
 * each machine type, firmware, drive syntax, disk bus and image format, and the set-ups qsnap
 * must refuse up front. `QSNAP_COMPAT=full` (make test-compat) runs them all and saves what
 * each observed to docs/compat.json; the README's table is rendered from that file.
 */
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { QmpClient } from '../../src/qmp/index.js';
import type { VmSpec } from '../../src/vm/spec.js';
import { ROOT } from '../support/env.js';

export const FULL = process.env['QSNAP_COMPAT'] === 'full';

/** What one set-up needs besides the test guest's defaults, built in its directory. */
export interface Built {
  /** Changes to the test guest's spec (machine, CPUs, disks, extra arguments). */
  spec: Partial<VmSpec>;
  /** The raw disk the workload's record ring must be on, as the guest names it. */
  workloadDisk: string;
  /** Done on the running guest before the snapshot (a hot-plug). */
  beforeSnapshot?: (qmp: QmpClient) => Promise<void>;
  /** Arguments a restore's command line needs on top of the booted one (what was hot-plugged). */
  restoreArgs?: string[];
}

export interface Setup {
  id: string;
  /** The README table's columns. */
  machine: string;
  firmware: 'SeaBIOS' | 'OVMF';
  disks: string;
  other: string;
  /** The kernel command-line additions: which disk the workload uses, extra drivers. */
  append?: string;
  /** Part of `make test` (the rest runs in `make test-compat`). */
  quick?: boolean;
  /** A refusal before anything is touched, with this code, instead of a snapshot. */
  refused?: string;
  build(dir: string, images: Images): Built;
}

export interface Images {
  /** `qemu-img create` of a `format` image of `mib` MiB in the set-up's directory. */
  create(name: string, format: 'qcow2' | 'raw', mib: number): string;
}

const OVMF_CODE = '/usr/share/OVMF/OVMF_CODE_4M.fd';
const OVMF_VARS = '/usr/share/OVMF/OVMF_VARS_4M.fd';
/** Records of the workload's disk ring (4 KiB each) and the image size that holds them. */
export const SLOTS = 4096;
const WORKLOAD_MIB = (SLOTS * 4096) / 2 ** 20 + 16;

function drive(options: Record<string, string>): string {
  return Object.entries(options)
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
}

/** A workload disk as `-blockdev` file + format nodes and a device on it (the default). */
function blockdev(file: string, format: string, node: string, device: string): string[] {
  return [
    '-blockdev',
    drive({ driver: 'file', filename: file, 'node-name': `${node}-file` }),
    '-blockdev',
    drive({ driver: format, file: `${node}-file`, 'node-name': node }),
    '-device',
    `${device},drive=${node},id=${node}-dev`,
  ];
}

export const SETUPS: Setup[] = [
  {
    id: 'pc',
    machine: 'pc',
    firmware: 'SeaBIOS',
    disks: 'qcow2, virtio-blk (-blockdev)',
    other: '',
    build: (_dir, images) => ({
      spec: { disks: [{ file: images.create('disk.qcow2', 'qcow2', WORKLOAD_MIB) }] },
      workloadDisk: '/dev/vda',
    }),
  },
  {
    id: 'q35',
    machine: 'q35',
    firmware: 'SeaBIOS',
    disks: 'qcow2, virtio-blk (-blockdev)',
    other: '',
    build: (_dir, images) => ({
      spec: { machine: 'q35', disks: [{ file: images.create('disk.qcow2', 'qcow2', WORKLOAD_MIB) }] },
      workloadDisk: '/dev/vda',
    }),
  },
  {
    id: 'q35-ovmf',
    machine: 'q35',
    firmware: 'OVMF',
    disks: 'qcow2 + raw virtio-blk, CD-ROM',
    other: 'writable vars pflash, virtio-net (-netdev user)',
    quick: true,
    build: (dir, images) => {
      const vars = join(dir, 'OVMF_VARS.fd');
      copyFileSync(OVMF_VARS, vars);
      const cd = images.create('cd.iso', 'raw', 1);
      return {
        spec: {
          machine: 'q35',
          disks: [
            { file: images.create('disk.qcow2', 'qcow2', WORKLOAD_MIB) },
            { file: images.create('data.raw', 'raw', 8), format: 'raw' },
          ],
          extraArgs: [
            '-drive',
            drive({ if: 'pflash', format: 'raw', unit: '0', file: OVMF_CODE, readonly: 'on' }),
            '-drive',
            drive({ if: 'pflash', format: 'raw', unit: '1', file: vars }),
            '-drive',
            drive({ file: cd, media: 'cdrom', format: 'raw', if: 'ide' }),
            '-netdev',
            'user,id=net0',
            '-device',
            'virtio-net-pci,netdev=net0',
          ],
        },
        workloadDisk: '/dev/vda',
      };
    },
  },
  {
    id: 'drive-if-virtio',
    machine: 'pc',
    firmware: 'SeaBIOS',
    disks: 'qcow2, -drive if=virtio',
    other: '',
    build: (_dir, images) => ({
      spec: {
        extraArgs: [
          '-drive',
          drive({ file: images.create('disk.qcow2', 'qcow2', WORKLOAD_MIB), if: 'virtio', format: 'qcow2' }),
        ],
      },
      workloadDisk: '/dev/vda',
    }),
  },
  {
    id: 'drive-none-raw',
    machine: 'pc',
    firmware: 'SeaBIOS',
    disks: 'raw, -drive if=none + -device virtio-blk-pci',
    other: '',
    build: (_dir, images) => ({
      spec: {
        extraArgs: [
          '-drive',
          drive({
            file: images.create('disk.raw', 'raw', WORKLOAD_MIB),
            if: 'none',
            id: 'd0',
            format: 'raw',
          }),
          '-device',
          'virtio-blk-pci,drive=d0',
        ],
      },
      workloadDisk: '/dev/vda',
    }),
  },
  {
    id: 'ide',
    machine: 'pc',
    firmware: 'SeaBIOS',
    disks: 'qcow2, IDE (-drive if=ide)',
    other: '',
    append: 'qsnap.disk=/dev/sda qsnap.extra=1',
    build: (_dir, images) => ({
      spec: {
        extraArgs: [
          '-drive',
          drive({ file: images.create('disk.qcow2', 'qcow2', WORKLOAD_MIB), if: 'ide', format: 'qcow2' }),
        ],
      },
      workloadDisk: '/dev/sda',
    }),
  },
  {
    id: 'virtio-scsi',
    machine: 'q35',
    firmware: 'SeaBIOS',
    disks: 'qcow2, virtio-scsi (scsi-hd)',
    other: '',
    append: 'qsnap.disk=/dev/sda qsnap.extra=1',
    build: (_dir, images) => ({
      spec: {
        machine: 'q35',
        extraArgs: [
          '-device',
          'virtio-scsi-pci,id=scsi0',
          ...blockdev(
            images.create('disk.qcow2', 'qcow2', WORKLOAD_MIB),
            'qcow2',
            'sd0',
            'scsi-hd,bus=scsi0.0',
          ),
        ],
      },
      workloadDisk: '/dev/sda',
    }),
  },
  {
    id: 'smp4',
    machine: 'pc',
    firmware: 'SeaBIOS',
    disks: 'qcow2, virtio-blk (-blockdev)',
    other: '-smp 4',
    build: (_dir, images) => ({
      spec: { cpus: 4, disks: [{ file: images.create('disk.qcow2', 'qcow2', WORKLOAD_MIB) }] },
      workloadDisk: '/dev/vda',
    }),
  },
  {
    id: 'hotplug',
    machine: 'pc',
    firmware: 'SeaBIOS',
    disks: 'qcow2 + a qcow2 hot-plugged after boot',
    other: 'restored with the hot-plugged disk added to the command line',
    build: (_dir, images) => {
      const hot = images.create('hot.qcow2', 'qcow2', 8);
      const hotArgs = blockdev(hot, 'qcow2', 'hot0', 'virtio-blk-pci,addr=0x9');
      return {
        spec: { disks: [{ file: images.create('disk.qcow2', 'qcow2', WORKLOAD_MIB) }] },
        workloadDisk: '/dev/vda',
        beforeSnapshot: async (qmp) => {
          await qmp.execute('blockdev-add', { driver: 'file', filename: hot, 'node-name': 'hot0-file' });
          await qmp.execute('blockdev-add', { driver: 'qcow2', file: 'hot0-file', 'node-name': 'hot0' });
          await qmp.execute('device_add', {
            driver: 'virtio-blk-pci',
            drive: 'hot0',
            id: 'hot0-dev',
            addr: '0x9',
          });
        },
        restoreArgs: hotArgs,
      };
    },
  },
  {
    id: 'qemu-snapshot',
    machine: 'pc',
    firmware: 'SeaBIOS',
    disks: 'qcow2, -drive if=virtio, under QEMU’s -snapshot',
    other: 'its temporary overlay is deleted when QEMU exits',
    refused: 'QSNAP_SNAPSHOT_UNSUPPORTED',
    quick: true,
    build: (_dir, images) => ({
      spec: {
        // -snapshot applies to -drive only (a -blockdev disk is left as it is).
        extraArgs: [
          '-drive',
          drive({ file: images.create('disk.qcow2', 'qcow2', WORKLOAD_MIB), if: 'virtio', format: 'qcow2' }),
          '-snapshot',
        ],
      },
      workloadDisk: '/dev/vda',
    }),
  },
  {
    id: 'drive-snapshot-on',
    machine: 'pc',
    firmware: 'SeaBIOS',
    disks: 'qcow2 + a second drive with snapshot=on',
    other: '',
    refused: 'QSNAP_SNAPSHOT_UNSUPPORTED',
    build: (_dir, images) => ({
      spec: {
        disks: [{ file: images.create('disk.qcow2', 'qcow2', WORKLOAD_MIB) }],
        extraArgs: [
          '-drive',
          drive({ file: images.create('scratch.qcow2', 'qcow2', 8), if: 'virtio', snapshot: 'on' }),
        ],
      },
      workloadDisk: '/dev/vda',
    }),
  },
  {
    id: 'nvme',
    machine: 'pc',
    firmware: 'SeaBIOS',
    disks: 'qcow2 + an emulated NVMe disk',
    other: 'QEMU’s nvme device is not migratable',
    refused: 'QSNAP_SNAPSHOT_UNSUPPORTED',
    quick: true,
    build: (_dir, images) => ({
      spec: {
        disks: [{ file: images.create('disk.qcow2', 'qcow2', WORKLOAD_MIB) }],
        extraArgs: [
          '-drive',
          drive({ file: images.create('nvme.raw', 'raw', 8), if: 'none', id: 'nv0', format: 'raw' }),
          '-device',
          'nvme,drive=nv0,serial=qsnap0',
        ],
      },
      workloadDisk: '/dev/vda',
    }),
  },
];

/** What a set-up observed on one QEMU (the README's cell). */
export interface CompatCell {
  setup: string;
  qemu: string;
  result: string;
}

const RESULTS = join(ROOT, 'docs', 'compat.json');

export function loadCells(): CompatCell[] {
  if (!existsSync(RESULTS)) return [];
  return (JSON.parse(readFileSync(RESULTS, 'utf8')) as { cells: CompatCell[] }).cells;
}

/** A full run's cells replace those of the same set-up and QEMU. */
export function saveCells(cells: readonly CompatCell[]): void {
  const kept = loadCells().filter((c) => !cells.some((n) => n.setup === c.setup && n.qemu === c.qemu));
  const all = [...kept, ...cells].sort(
    (a, b) => a.setup.localeCompare(b.setup) || a.qemu.localeCompare(b.qemu),
  );
  writeFileSync(RESULTS, `${JSON.stringify({ ranAt: new Date().toISOString(), cells: all }, null, 1)}\n`);
}

export const TABLE_START = '<!-- compat-table: generated by make test-compat from docs/compat.json -->';
export const TABLE_END = '<!-- /compat-table -->';

/** The README's compatibility table: a row per set-up, a column per QEMU version. */
export function renderCompat(cells: readonly CompatCell[], extraRows: readonly CompatRow[]): string {
  const versions = [...new Set(cells.map((c) => c.qemu))].sort((a, b) =>
    a.localeCompare(b, 'en', { numeric: true }),
  );
  const lines = [
    `| machine | firmware | disks | also | ${versions.map((v) => `QEMU ${v}`).join(' | ')} |`,
    `|---|---|---|---|${versions.map(() => '---').join('|')}|`,
  ];
  for (const s of SETUPS) {
    const row = versions.map((v) => cells.find((c) => c.setup === s.id && c.qemu === v)?.result ?? '—');
    lines.push(`| ${s.machine} | ${s.firmware} | ${s.disks} | ${s.other} | ${row.join(' | ')} |`);
  }
  for (const r of extraRows) {
    const row = versions.map((v) => cells.find((c) => c.setup === r.id && c.qemu === v)?.result ?? '—');
    lines.push(`| ${r.title} | | | | ${row.join(' | ')} |`);
  }
  return [TABLE_START, ...lines, TABLE_END].join('\n');
}

/** Rows that are not a boot of one set-up: across QEMU versions. */
export interface CompatRow {
  id: string;
  title: string;
}

export const CROSS_ROWS: CompatRow[] = [
  { id: 'forward', title: 'snapshot on 7.2, restored on 10.0 (`pc-i440fx-7.2`)' },
  { id: 'backward', title: 'snapshot on 10.0, restored on 7.2' },
];
