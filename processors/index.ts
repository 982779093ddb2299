import type { ProcessorSpec } from './processor.ts'
import { readingsProcessor } from './readings.ts'

/** Every processor fleetstream runs, by name. */
export const processors: Readonly<Record<string, ProcessorSpec>> = {
  [readingsProcessor.name]: readingsProcessor,
}
