/** Shapes shared by the codec, the parser and the writer of QEMU migration streams. */

/** One RAM block as the RAM START section lists it (migration/ram.c, ram_save_setup). */
export interface RamBlock {
  /** The block's id string, e.g. `pc.ram`, `/rom@etc/acpi/tables`. */
  idstr: string;
  /** Bytes of the block that migrate (`used_length`), a multiple of the 4096-byte page. */
  usedLength: number;
  /** Guest address of the block's memory region; present only with the x-ignore-shared capability. */
  mrAddr?: bigint;
}

/** Header, version and configuration section (migration/savevm.c, qemu_savevm_state_header). */
export interface StreamPrologue {
  /** File format version; always 3. */
  version: number;
  /** Machine type, e.g. `pc-i440fx-7.2`; undefined for streams without a configuration section. */
  machine: string | undefined;
  /** `configuration/uuid`, formatted 8-4-4-4-12, when the source set validate-uuid. */
  uuid?: string;
  /** `configuration/capabilities`: migration capabilities the destination must match. */
  capabilities: string[];
  /** `configuration/target-page-bits` when present (never on x86). */
  targetPageBits?: number;
}

export interface PrologueEvent extends StreamPrologue {
  /** Exact bytes from the magic through the configuration section (a copy the sink may keep). */
  bytes: Buffer;
}

/** The RAM START section: its section id and block list. */
export interface RamSetup {
  sectionId: number;
  blocks: RamBlock[];
  /** True when the stream carries section footers (every machine type since 2.4). */
  footers: boolean;
  /** True when blocks carry their memory-region address (x-ignore-shared). */
  ignoreShared: boolean;
}

export interface RamSetupEvent extends RamSetup {
  /** Exact bytes of the whole START section, header through footer (a copy the sink may keep). */
  bytes: Buffer;
}

/** The VMDESCRIPTION JSON QEMU appends after EOF (migration/savevm.c, vmstate JSON writer). */
export interface VmDescription {
  page_size: number;
  devices: Array<{ name: string; instance_id: number; [key: string]: unknown }>;
  [key: string]: unknown;
}

export interface BlockCounts {
  idstr: string;
  pages: number;
  zeroPages: number;
}

export interface StreamSummary {
  /** Bytes of stream consumed. */
  streamBytes: number;
  prologueBytes: number;
  /** Number of RAM PART sections. */
  ramParts: number;
  /** Whether a RAM END section was seen (precopy; never in background-snapshot streams). */
  ramEnd: boolean;
  /** Data pages (4096 bytes each) and zero pages, in total and per block (in block-list order). */
  pages: number;
  zeroPages: number;
  blocks: BlockCounts[];
  /** No-op records the parser skipped: MULTIFD_FLUSH (≥ 8.1), COMMAND SWITCHOVER_START (≥ 10.0). */
  skippedRecords: number;
  /** Absolute offset of the first byte of the device tail, and its length in bytes. */
  deviceTailOffset: number;
  deviceTailBytes: number;
  /** Absolute offset of the EOF byte that ends the device sections. */
  eofOffset: number;
  /** The parsed VMDESCRIPTION, when the stream has one, and its JSON length in bytes. */
  vmDescription?: VmDescription;
  vmDescriptionBytes?: number;
}

/**
 * What the parser reports, in stream order. Callbacks are synchronous; a callback that throws
 * stops the parser, and the error comes out of the `feed()`/`end()` that called it.
 */
export interface StreamSink {
  /** Header and configuration, once, first. */
  onPrologue(prologue: PrologueEvent): void;
  /** The RAM START section, once (background snapshot: the VM may still be running). */
  onRamSetup(setup: RamSetupEvent): void;
  /**
   * A data page: `data` is exactly 4096 bytes and valid only during the call (a zero-copy view
   * of the input when it lies in one chunk, else a reused scratch buffer): copy it if kept.
   */
  onPage(blockIndex: number, offset: number, data: Buffer): void;
  /** A page that is all zero bytes. */
  onZeroPage(blockIndex: number, offset: number): void;
  /**
   * A RAM PART section starts at absolute stream offset `streamOffset`. Index 0 is the first one:
   * in a background-snapshot stream, QEMU writes it only after it captured the device state and
   * write-protected RAM (migration/migration.c, bg_migration_thread), so it is the signal that
   * the guest may be resumed.
   */
  onRamPart(index: number, streamOffset: number): void;
  /** The RAM END section (precopy streams only). */
  onRamEnd?(): void;
  /** The device state begins at absolute stream offset `streamOffset` (all RAM has been sent). */
  onDeviceTailStart?(streamOffset: number): void;
  /**
   * The stream ended complete and valid. `deviceTail` is the device state verbatim: every byte
   * from the first section that is not RAM through EOF and VMDESCRIPTION (the parser keeps it
   * to find its end, bounded by maxDeviceTailBytes; the sink may keep this buffer).
   */
  onEnd(summary: StreamSummary, deviceTail: Buffer): void;
}

/** A run of consecutive pages of one block, as a writer source yields them. */
export type RamPageRun =
  /** `data.length / 4096` data pages starting at `offset`; `data.length` a multiple of 4096. */
  | { offset: number; data: Buffer }
  /** `zeroPages` zero pages starting at `offset`. */
  | { offset: number; zeroPages: number };
