"""`taskfarm-admin`: set up the database and manage users.

    taskfarm-admin init-db
    taskfarm-admin adduser NAME [--password P] [--admin]
    taskfarm-admin passwd NAME [--password P]
    taskfarm-admin deluser NAME [--with-runs]
    taskfarm-admin users

The original's `adminTF --init-db` and `adminTF -u USER -p PASSWORD` work too.
The database comes from DATABASE_URL, as for the server.
"""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys

import taskfarm
from store import Store


def read_password(given: str | None) -> str:
    if given is not None:
        return given
    if not sys.stdin.isatty():
        sys.exit('taskfarm-admin: give --password, or run on a terminal to be asked.')
    password = getpass.getpass('Password: ')
    if password != getpass.getpass('Again: '):
        sys.exit('taskfarm-admin: the passwords differ.')
    return password


def valid_username(name: str) -> str:
    if not name or len(name) > 64 or ':' in name or name.startswith('tf1.'):
        sys.exit(f'taskfarm-admin: invalid user name {name!r} '
                 '(1 to 64 characters, no colon, not starting with "tf1.").')
    return name


def create_user(store: Store, name: str, password_hash: str, admin: bool = False) -> bool:
    """Add a user with a hashed password; False if the name is taken.

    A new token stamp, so that no token issued before can be this user's.
    """
    return store.add_user(valid_username(name), password_hash, secrets.token_hex(8), admin)


def init_db(store: Store, args: argparse.Namespace) -> None:
    store.init()
    print('database ready')


def add_user(store: Store, args: argparse.Namespace) -> None:
    password_hash = taskfarm.hash_password(read_password(args.password))
    if not create_user(store, args.name, password_hash, args.admin):
        sys.exit(f'taskfarm-admin: user {args.name!r} exists already.')
    print(f"added {'admin ' if args.admin else ''}user {args.name}")


def change_password(store: Store, args: argparse.Namespace) -> None:
    password_hash = taskfarm.hash_password(read_password(args.password))
    # A new token stamp makes every token issued before the change invalid.
    if not store.set_password(args.name, password_hash, secrets.token_hex(8)):
        sys.exit(f'taskfarm-admin: no user {args.name!r}.')
    print(f'password of {args.name} changed; their old tokens no longer work')


def delete_user(store: Store, args: argparse.Namespace) -> None:
    runs = store.count_runs_of(args.name)
    if runs and not args.with_runs:
        sys.exit(f'taskfarm-admin: {args.name} owns {runs} run(s); '
                 'add --with-runs to delete them too.')
    if not store.delete_user(args.name):
        sys.exit(f'taskfarm-admin: no user {args.name!r}.')
    print(f'deleted user {args.name} and {runs} run(s)')


def list_users(store: Store, args: argparse.Namespace) -> None:
    for row in store.users():
        admin = ' (admin)' if row['is_admin'] else ''
        print(f"{row['username']}{admin}: {row['runs']} run(s)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog='taskfarm-admin', description=__doc__.split('\n')[0])
    commands = top.add_subparsers(dest='command', required=True)
    commands.add_parser('init-db', help='create the tables and the token secret'
                        ).set_defaults(run=init_db)
    add = commands.add_parser('adduser', help='add a user')
    add.add_argument('name')
    add.add_argument('--password', help='else asked for on the terminal')
    add.add_argument('--admin', action='store_true', help='may see every run')
    add.set_defaults(run=add_user)
    passwd = commands.add_parser('passwd', help="change a user's password")
    passwd.add_argument('name')
    passwd.add_argument('--password', help='else asked for on the terminal')
    passwd.set_defaults(run=change_password)
    delete = commands.add_parser('deluser', help='delete a user')
    delete.add_argument('name')
    delete.add_argument('--with-runs', action='store_true', help='and the runs they own')
    delete.set_defaults(run=delete_user)
    commands.add_parser('users', help='list the users').set_defaults(run=list_users)
    return top


def legacy_parser() -> argparse.ArgumentParser:
    """The original `adminTF` flags."""
    legacy = argparse.ArgumentParser(prog='adminTF')
    legacy.add_argument('-u', '--user', help='the taskfarm user')
    legacy.add_argument('-p', '--password', help='the password of the taskfarm user')
    legacy.add_argument('--init-db', action='store_true', help='initialise database')
    return legacy


def legacy_commands(argv: list[str]) -> list[argparse.Namespace]:
    args = legacy_parser().parse_args(argv)
    steps = []
    if args.init_db:
        steps.append(argparse.Namespace(run=init_db))
    if args.user is not None:
        if args.password is None:
            legacy_parser().error('need to set password')
        steps.append(argparse.Namespace(run=add_user, name=args.user,
                                        password=args.password, admin=False))
    return steps


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith('-') and argv[0] not in ('-h', '--help'):
        steps = legacy_commands(argv)
    else:
        steps = [parser().parse_args(argv)]
    store = taskfarm.open_store(taskfarm.Config.from_env())
    try:
        for step in steps:
            step.run(store, step)
    finally:
        store.close()


if __name__ == '__main__':
    main()
