"""A Modbus TCP server for Citywatch's end-to-end tests (pymodbus 3.0, Debian python3-pymodbus).

argv: PORT UNITS (comma-separated unit ids; PORT 0: the system picks one). Once listening it
prints "listening PORT" (the bound port) on stdout. Registers start at 0 (zero_mode). Commands
on stdin, one per line, each answered with "ok" on stdout once applied:
    set UNIT input|holding ADDRESS VALUE [VALUE ...]
End of stdin stops the server.
"""
import asyncio
import os
import sys

from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext, ModbusSlaveContext
from pymodbus.server import StartAsyncTcpServer


def block():
    return ModbusSequentialDataBlock(0, [0] * 1024)


async def main():
    port = int(sys.argv[1])
    units = [int(u) for u in sys.argv[2].split(",")]
    slaves = {u: ModbusSlaveContext(di=block(), co=block(), hr=block(), ir=block(), zero_mode=True) for u in units}
    context = ModbusServerContext(slaves=slaves, single=False)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands():
        while True:
            line = await reader.readline()
            if not line:
                os._exit(0)
            parts = line.decode().split()
            if not parts:
                continue
            if parts[0] == "set":
                unit, table, address = int(parts[1]), parts[2], int(parts[3])
                values = [int(v) for v in parts[4:]]
                context[unit].setValues(4 if table == "input" else 3, address, values)
                print("ok", flush=True)
            else:
                print("error unknown command", flush=True)

    server = await StartAsyncTcpServer(context=context, address=("127.0.0.1", port), defer_start=True)
    serving = asyncio.get_running_loop().create_task(server.serve_forever())
    await server.serving
    print("listening", server.server.sockets[0].getsockname()[1], flush=True)
    asyncio.get_running_loop().create_task(commands())
    await serving


asyncio.run(main())
