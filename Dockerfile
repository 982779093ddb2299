# fleetstream: the application image for docker compose (infra/docker-compose.yml). One image
# for every fleetstream command: setup, run <processor>, simulate, dlq, alerts.
#
#   docker build -t fleetstream .
#   docker run --rm fleetstream --help

# ---- build: install everything, compile TypeScript, then drop the dev dependencies
FROM node:24-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY app ./app
COPY cli ./cli
COPY infra ./infra
COPY processors ./processors
COPY projections ./projections
COPY schemas ./schemas
COPY simulator ./simulator
RUN npm run build && npm prune --omit=dev --no-audit --no-fund

# ---- runtime: the compiled code, production dependencies and the default alert rules
FROM node:24-bookworm-slim
ENV NODE_ENV=production
WORKDIR /app
COPY --from=build /app/package.json ./
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY config ./config
USER node
# --max-semi-space-size: a smaller young generation, less peak RSS (cli/fleetstream.ts).
ENTRYPOINT ["node", "--max-semi-space-size=4", "dist/cli/fleetstream.js"]
CMD ["--help"]
