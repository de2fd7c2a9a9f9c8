/* main.c -- the moeserve binary: flags and environment -> server_run. */
#include <signal.h>
#include <stdio.h>

#include "server/config.h"
#include "server/server.h"

int main(int argc, char **argv)
{
    server_config cfg;
    char err[512];
    server_config_default(&cfg);
    int rc = server_config_parse(&cfg, argc, argv, err, sizeof err);
    if (rc) {
        if (rc < 0) fprintf(stderr, "moeserve: %s\n", err);
        server_config_free(&cfg);
        return rc > 0 ? 0 : 2;
    }
    signal(SIGPIPE, SIG_IGN);  /* a vanished client is an error code, not a death */
    moe_server *s;
    if (server_create(&cfg, &s, err, sizeof err)) {
        fprintf(stderr, "moeserve: %s\n", err);
        server_config_free(&cfg);
        return 1;
    }
    rc = server_run(s);
    server_free(s);
    server_config_free(&cfg);
    return rc;
}
