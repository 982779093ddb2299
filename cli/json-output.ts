/**
 * The one rule of `--json`, the same for every command (README.md, "The CLI"):
 *
 * - a command that ends (`setup`, `status`, `alerts list`, ...) prints ONE JSON document on
 *   stdout: an object, or an array when it lists things;
 * - a command that follows (`events tail`, `start`) prints JSON lines: one object per line, as
 *   they happen, until it stops;
 * - nothing else is on stdout: progress bars, hints and logs go to stderr.
 *
 * ```sh
 * fleetstream alerts list --json | jq length
 * fleetstream events tail --json | while read -r e; do ...; done
 * ```
 */
export const JSON_HELP = {
  /** `--json` of a finite command that prints one object. */
  document: (what: string): string => `print ${what} as one JSON document on stdout`,
  /** `--json` of a finite command that lists things. */
  array: (what: string): string => `print the ${what} as one JSON document on stdout: an array`,
  /** `--json` of a command that follows. */
  lines: (what: string): string =>
    `print one JSON object per ${what} on stdout, one per line (JSON lines)`,
} as const

/** The rule as the top-level help states it. */
export const JSON_RULE = `--json: a command that ends prints one JSON document on stdout (an array when it lists
things); a command that follows (events tail, start) prints one JSON object per line. Progress,
hints and logs go to stderr. For clean stdout, run the CLI as 'npm run -s fleetstream -- ...' or
'npx fleetstream ...' (after npm run build).`
