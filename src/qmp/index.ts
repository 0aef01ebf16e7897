/** The QMP client: connect to QEMU's monitor, run typed commands, receive events. */
export {
  type ExecuteOptions,
  QmpClient,
  type QmpClientOptions,
  type QmpClientState,
  type QmpGreeting,
  type QmpLogger,
} from './client.js';
export {
  type BlockdevOptions,
  type CommandArgs,
  type CommandName,
  type CommandReturn,
  commands,
  isCommandName,
  type TransactionAction,
} from './commands.js';
export {
  type ConnectFailure,
  type ConnectPhase,
  type DisconnectReason,
  type ProtocolFailure,
  QmpCommandError,
  QmpConnectError,
  QmpDisconnectedError,
  QmpError,
  QmpEventOverflowError,
  QmpProtocolError,
  QmpTimeoutError,
} from './errors.js';
export {
  DEFAULT_MAX_BUFFERED_EVENTS,
  type EventData,
  type EventFilter,
  type EventListener,
  type EventName,
  eventDataSchemas,
  type KnownEventName,
  type QmpEvent,
  type WaitForOptions,
} from './events.js';
export { DEFAULT_MAX_LINE_BYTES, encodeMessage, JsonLineDecoder } from './framing.js';
export { parseMessage, type QmpMessage, timestampToUs } from './message.js';
export type { JobStatus, MigrationCapability, MigrationStatus, RunState } from './qapi.js';
export { describeTarget, parseTarget, type QmpTarget } from './transport.js';
