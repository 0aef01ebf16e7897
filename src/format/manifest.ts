/**
 * The manifest: the UTF-8 JSON document near the end of a snapshot file that says what the
 * snapshot is and where its regions are. docs/format.md "Manifest" describes every field.
 *
 * Compatibility: `version` is the format's major version. Every field qsnap reads is validated
 * strictly (types, ranges); unknown fields are kept (loose objects), so a newer qsnap of the same
 * major version may add fields that this one carries along. A higher major version is refused.
 */
import path from 'node:path';
import { z } from 'zod';
import { FORMAT_VERSION_MAJOR, PAGE_SIZE } from './codec.js';

export const MANIFEST_FORMAT = 'qsnap-snapshot';

const UInt = z.int().nonnegative();
const Sha256Hex = z.string().regex(/^[0-9a-f]{64}$/, 'expected 64 lower-case hex digits');
const IsoTime = z.iso.datetime({ offset: true });
const AbsolutePath = z.string().refine((p) => path.isAbsolute(p), 'expected an absolute path');
const Millis = z.number().nonnegative();

/** A byte range of the file with the sha256 of its contents. */
export const RegionSchema = z.looseObject({ offset: UInt, length: UInt, sha256: Sha256Hex });

export const RamBlockSchema = z.looseObject({
  /** RAMBlock idstr as in the stream, e.g. "pc.ram". */
  name: z.string().min(1).max(255),
  usedLength: z.int().positive(),
  fileOffset: UInt,
  fileLength: UInt,
  /** Pages stored as data (non-zero contents). */
  dataPages: UInt,
  /** Pages that are zero: holes in the file (zero pages, all-zero data pages). */
  zeroPages: UInt,
  /** Pages never delivered by the stream (holes too; only with finish({allowMissingPages})). */
  missingPages: UInt.default(0),
  /**
   * Page indexes (within the block) of data pages whose CRC-32 happens to equal the zero-page CRC
   * (chance 2^-32 per page). Everywhere else, a page-table entry equal to ZERO_PAGE_CRC means "zero
   * page", which lets a reader skip holes without reading them.
   */
  zeroCrcDataPages: z.array(UInt).default([]),
});

/** QEMU RunState names (qapi/run-state.json) are lower-case words joined by '-'. */
const RunState = z.string().regex(/^[a-z][a-z0-9-]*$/, 'expected a QEMU run state such as "running"');

export const DiskSchema = z.looseObject({
  /** Guest device (qdev id or block backend name). */
  device: z.string().min(1),
  /** Node name of the image frozen at the snapshot instant. */
  nodeName: z.string().min(1),
  /** Image format of the frozen file, e.g. "qcow2": a driver name, never options (it reaches qemu-img -F). */
  format: z.string().regex(/^[a-z][a-z0-9_-]{0,31}$/, 'expected a QEMU image format name such as "qcow2"'),
  virtualSize: UInt,
  /** The image as it was at the snapshot instant; nothing writes to it any more. */
  frozenFile: AbsolutePath,
  /** The overlay the running VM writes to since the snapshot. */
  overlayFile: AbsolutePath,
  overlayNodeName: z.string().min(1),
  /** The frozen file and the images below it at snapshot time, top first (history: a store merge may shorten the chain; readers follow the images' headers). */
  backingChain: z.array(AbsolutePath).min(1).optional(),
});

export const ManifestSchema = z.looseObject({
  format: z.literal(MANIFEST_FORMAT),
  /** 1 or 2 (the layout: docs/format.md); qsnap writes FORMAT_VERSION_MAJOR. */
  version: z.union([z.literal(1), z.literal(FORMAT_VERSION_MAJOR)]),
  id: z.uuid(),
  createdAt: IsoTime,
  qemu: z.looseObject({
    version: z.looseObject({ major: UInt, minor: UInt, micro: UInt }),
    /** query-version "package", e.g. "Debian 1:7.2+dfsg-7+deb12u7". */
    package: z.string(),
    machine: z.string().min(1),
    accel: z.string().min(1).optional(),
    commandLine: z.array(z.string()).optional(),
  }),
  vm: z.looseObject({
    ramBytes: z.int().positive(),
    runStateBefore: RunState,
    name: z.string().optional(),
  }),
  /**
   * How the stream was produced: a background snapshot of a running guest (point in time = its
   * start), a plain precopy migration of a guest that was paused throughout, or a live precopy
   * migration of a running guest paused at its switchover (point in time = the switchover).
   */
  strategy: z.enum(['background-snapshot', 'stopped-precopy', 'live-precopy']),
  pointInTime: z.looseObject({
    wallClock: IsoTime,
    /** QMP event timestamp of the pause, in microseconds since the epoch. */
    qemuTimestampUs: UInt.optional(),
  }),
  ram: z.looseObject({
    pageSize: z.literal(PAGE_SIZE),
    blocks: z.array(RamBlockSchema).min(1),
    pageTable: RegionSchema,
    /** v2: the sha256 of the link pages between the blocks, in file order. */
    links: z.looseObject({ sha256: Sha256Hex }).optional(),
  }),
  stream: z.looseObject({
    /** Header + configuration + RAM START section, verbatim. */
    prologue: RegionSchema,
    /** Device state sections + EOF + VMDESCRIPTION, verbatim. */
    deviceTail: RegionSchema,
    /** QEVM stream version (3). */
    streamVersion: UInt,
    /** Section id of the "ram" section in the original stream. */
    ramSectionId: UInt,
    /** Device idstrs from VMDESCRIPTION, for display. */
    devices: z.array(z.string()).optional(),
  }),
  /**
   * v2: the regions that make the file a mapped-ram migration stream QEMU ≥ 9.0 loads itself
   * (docs/format.md "The mapped-ram view"); all three empty when the file has no such view.
   */
  mappedRam: z
    .looseObject({
      glue: RegionSchema,
      bitmaps: RegionSchema,
      prefix: RegionSchema,
      /** Where QEMU starts reading: the prefix's offset (`file:…,offset=`). */
      streamOffset: UInt,
    })
    .optional(),
  disks: z.array(DiskSchema),
  skippedDisks: z.array(z.looseObject({ device: z.string().min(1), reason: z.string() })),
  timings: z.object({ downtimeMs: Millis, totalMs: Millis, streamMs: Millis }).catchall(Millis),
  counts: z
    .object({
      /** Data pages stored in the file (final state of each page). */
      pagesWritten: UInt,
      /** Zero pages (holes), including data pages that were all zeros. */
      zeroPages: UInt,
      missingPages: UInt.default(0),
      /** Page records for a page already seen (0 for a background snapshot). */
      duplicatePages: UInt.default(0),
      /** Bytes of the migration stream received. */
      streamBytes: UInt,
    })
    .catchall(UInt),
});

export type Manifest = z.output<typeof ManifestSchema>;
export type ManifestInput = z.input<typeof ManifestSchema>;
export type RamBlockEntry = z.output<typeof RamBlockSchema>;
export type Region = z.output<typeof RegionSchema>;
export type DiskEntry = z.output<typeof DiskSchema>;

export type ManifestParse =
  | { ok: true; manifest: Manifest }
  | { ok: false; problem: 'not-json' | 'not-manifest'; message: string }
  | { ok: false; problem: 'newer-version'; version: number }
  | { ok: false; problem: 'invalid'; message: string; issues: z.core.$ZodIssue[] };

/** Parses manifest bytes. Version is checked before the schema, so a newer manifest is named as such. */
export function parseManifest(bytes: Uint8Array): ManifestParse {
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (err) {
    return { ok: false, problem: 'not-json', message: (err as Error).message };
  }
  if (typeof raw !== 'object' || raw === null || (raw as { format?: unknown }).format !== MANIFEST_FORMAT) {
    return { ok: false, problem: 'not-manifest', message: `"format" is not "${MANIFEST_FORMAT}"` };
  }
  const version = (raw as { version?: unknown }).version;
  if (typeof version === 'number' && version > FORMAT_VERSION_MAJOR) {
    return { ok: false, problem: 'newer-version', version };
  }
  const parsed = ManifestSchema.safeParse(raw);
  if (!parsed.success) {
    return {
      ok: false,
      problem: 'invalid',
      message: z.prettifyError(parsed.error),
      issues: parsed.error.issues,
    };
  }
  return { ok: true, manifest: parsed.data };
}

export function serializeManifest(manifest: Manifest): Buffer {
  return Buffer.from(`${JSON.stringify(manifest, null, 2)}\n`, 'utf8');
}
