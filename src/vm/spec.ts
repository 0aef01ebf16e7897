import { z } from 'zod';

/** A disk attached to the VM as `-blockdev file → format` plus a virtio-blk (or other) device. */
export const DiskSpec = z.strictObject({
  file: z.string().min(1),
  format: z.enum(['qcow2', 'raw']).default('qcow2'),
  /** Node name of the format node; also the device's drive. Default: `disk<N>`. */
  nodeName: z
    .string()
    .regex(/^[A-Za-z][A-Za-z0-9_.-]*$/)
    .optional(),
  readOnly: z.boolean().default(false),
  bus: z.enum(['virtio', 'ide', 'scsi']).default('virtio'),
});
export type DiskSpec = z.infer<typeof DiskSpec>;

export const VmSpec = z.strictObject({
  name: z.string().optional(),
  qemuBinary: z.string().default('qemu-system-x86_64'),
  machine: z.string().default('pc'),
  memoryMiB: z
    .number()
    .int()
    .min(16)
    .max(1024 * 1024)
    .default(256),
  cpus: z.number().int().min(1).max(256).default(1),
  /** `auto` picks KVM only where it really runs a guest (see accel.ts), else TCG. */
  accel: z.enum(['auto', 'kvm', 'tcg']).default('auto'),
  kernel: z.string().optional(),
  initrd: z.string().optional(),
  append: z.string().optional(),
  disks: z.array(DiskSpec).default([]),
  /** Back guest RAM with a file (e.g. a shared file for tests that poke guest memory from the host). */
  memoryBackend: z
    .strictObject({
      file: z.string(),
      share: z.boolean().default(false),
      readOnly: z.boolean().default(false),
    })
    .optional(),
  /** Directory for the QMP socket, serial socket and logs. Default: a fresh temp directory. */
  runDir: z.string().optional(),
  /** QMP socket path. Default: `<runDir>/qmp.sock`. */
  qmp: z.string().optional(),
  /** Serial console: a unix socket server plus a log of everything the guest printed. */
  serial: z
    .union([z.literal('none'), z.strictObject({ socket: z.string().optional(), log: z.string().optional() })])
    .default({}),
  /** `-incoming` value, e.g. `defer` for restore. */
  incoming: z.string().optional(),
  /** Start with the CPUs stopped (`-S`). */
  paused: z.boolean().default(false),
  extraArgs: z.array(z.string()).default([]),
});
export type VmSpec = z.input<typeof VmSpec>;
export type ResolvedVmSpec = z.output<typeof VmSpec>;
