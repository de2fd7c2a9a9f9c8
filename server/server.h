/* server.h -- moeserve: HTTP (libmicrohttpd inside a libuv loop) in front of one
 * scheduler per model.
 *
 *   moe_server *s; server_create(&cfg, &s, err, sizeof err);   binds, starts loading
 *   int rc = server_run(s);     serves until SIGTERM/SIGINT drained it (0) or a model failed (1)
 *   server_free(s);
 *
 * Threads: the loop thread runs every HTTP callback, timer and signal; a loader
 * thread loads the models (the port answers /health and /ready meanwhile); each
 * model's scheduler thread runs its forward passes. See docs/ARCHITECTURE.md.
 */
#ifndef MOE_SERVER_SERVER_H
#define MOE_SERVER_SERVER_H

#include <stddef.h>

#include "server/config.h"

typedef struct moe_server moe_server;

/* cfg is borrowed and must outlive the server. */
int server_create(const server_config *cfg, moe_server **out, char *err, size_t errlen);
int server_run(moe_server *s);
void server_free(moe_server *s);
/* The port actually bound (useful with --port 0). */
int server_port(const moe_server *s);

#endif
