"""appraise"""
