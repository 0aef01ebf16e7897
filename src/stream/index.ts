export * from './codec.js';
export * from './errors.js';
export { MigrationStreamParser, type ParserOptions, parseMigrationStream } from './parser.js';
export type * from './types.js';
export {
  type MigrationStreamInput,
  type RamPageSource,
  SectionPool,
  writeMigrationStream,
} from './writer.js';
