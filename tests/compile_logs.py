# ruff: noqa: E501  (compiler lines are kept whole: they are the test data)
"""Compile logs of real builds, cut short, as test data (the sources never are).

``MOD_2_3_0_ON_6_12``: the collector's 2.3.0 kernel module (stackrox/falcosecurity-libs
v2.3.0; its Makefile and driver_config.h made from their templates by hand) built by
:func:`drivers.build.compile.build_driver` against Debian's 6.12.115+deb12-amd64 headers
(``drivers bundle debian``): a real, permanent failure (``fd_is_open`` and the old
``class_create`` are gone from 6.12; ``struct fd`` lost ``file``; ``strlcpy`` is gone).
The log (6,661 bytes, make -j2, 3.7 s) is cut to its command, its error lines and their
context lines; nothing else is changed. ``log_for`` gives the same failure as another
Debian flavour of the series would log it (only the header folder names its kernel).
"""

KERNEL = "6.12.115+deb12-amd64"
MOD_2_3_0_ON_6_12 = """\
# 6.12.115+deb12-amd64 2.3.0 mod
$ make -C $WORKDIR/bundle/usr/src/linux-headers-6.12.115+deb12-amd64 M=$WORKDIR/build/2.3.0/mod -j2 KCFLAGS=-ffile-prefix-map=$WORKDIR/= KBUILD_BUILD_TIMESTAMP=1970-01-01T00:00:00Z modules
make: Entering directory '$WORKDIR/bundle/usr/src/linux-headers-6.12.115+deb12-amd64'
$WORKDIR/build/2.3.0/mod/main.c: In function ‘drop_nostate_event_for’:
$WORKDIR/build/2.3.0/mod/main.c:2070:22: error: implicit declaration of function ‘fd_is_open’; did you mean ‘finish_open’? [-Werror=implicit-function-declaration]
$WORKDIR/build/2.3.0/mod/main.c: In function ‘scap_init’:
$WORKDIR/bundle/usr/src/linux-headers-6.12.115+deb12-common/include/linux/init.h:180:22: error: passing argument 1 of ‘class_create’ from incompatible pointer type [-Werror=incompatible-pointer-types]
$WORKDIR/build/2.3.0/mod/main.c:3237:36: note: in expansion of macro ‘THIS_MODULE’
$WORKDIR/build/2.3.0/mod/main.c:3237:23: error: too many arguments to function ‘class_create’
make[2]: *** [$WORKDIR/bundle/usr/src/linux-headers-6.12.115+deb12-common/scripts/Makefile.build:234: $WORKDIR/build/2.3.0/mod/main.o] Error 1
$WORKDIR/build/2.3.0/mod/ppm_events.c: In function ‘compute_snaplen’:
$WORKDIR/build/2.3.0/mod/ppm_events.c:400:22: error: ‘struct fd’ has no member named ‘file’
$WORKDIR/build/2.3.0/mod/ppm_events.c: In function ‘val_to_ring’:
$WORKDIR/build/2.3.0/mod/ppm_events.c:757:36: error: implicit declaration of function ‘strlcpy’; did you mean ‘strncpy’? [-Werror=implicit-function-declaration]
make[2]: *** [$WORKDIR/bundle/usr/src/linux-headers-6.12.115+deb12-common/scripts/Makefile.build:234: $WORKDIR/build/2.3.0/mod/ppm_events.o] Error 1
make[1]: *** [$WORKDIR/bundle/usr/src/linux-headers-6.12.115+deb12-common/Makefile:2007: $WORKDIR/build/2.3.0/mod] Error 2
make: *** [../linux-headers-6.12.115+deb12-common/Makefile:236: __sub-make] Error 2
"""
# What drivers.build.compile.first_error makes of it (the first error in source order).
FIRST_ERROR = (
    "build/2.3.0/mod/main.c:2070:22: error: implicit declaration of function ‘fd_is_open’; "
    "did you mean ‘finish_open’? [-Werror=implicit-function-declaration]"
)


def log_for(kernel: str) -> str:
    """The excerpt as building on ``kernel`` (another 6.12.115+deb12 flavour) logs it."""
    return MOD_2_3_0_ON_6_12.replace(KERNEL, kernel)
