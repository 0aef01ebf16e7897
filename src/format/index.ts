/** The snapshot file format: one file per snapshot, RAM at offset 0. See docs/format.md. */
export {
  decodePageTable,
  decodeTrailer,
  encodePageTable,
  encodeTrailer,
  FORMAT_VERSION_MAJOR,
  FORMAT_VERSION_MINOR,
  PAGE_SIZE,
  TRAILER_MAGIC,
  TRAILER_SIZE,
  type Trailer,
  ZERO_PAGE_CRC,
} from './codec.js';
export { type CorruptRegion, SnapshotFileError, type SnapshotFileErrorCode } from './errors.js';
export {
  type BlockLayout,
  type BlockSpec,
  type FileLayout,
  layoutFile,
  layoutRam,
  type RamLayout,
  type Span,
} from './layout.js';
export {
  type DiskEntry,
  type Manifest,
  type ManifestInput,
  ManifestSchema,
  parseManifest,
  type RamBlockEntry,
  type Region,
} from './manifest.js';
export {
  openSnapshot,
  type PageRun,
  type ReadPagesOptions,
  SnapshotReader,
  type VerifyOptions,
  type VerifyProgress,
  type VerifyResult,
} from './reader.js';
export {
  type FinishOptions,
  type MissingPages,
  type SnapshotInfo,
  SnapshotWriter,
  type SnapshotWriterOptions,
  type WriterCounts,
  type WriterState,
} from './writer.js';
