/* The server's settings (serve.h): filled by the binding (module.c) before serving, read
 * by every other part. Defined here, below them all, so that none of them refers up
 * into the binding. */
#include "serve.h"

struct server srv;
